"""The S3 server the object-store tests run against: a real SeaweedFS on loopback, with the conditional writes a
driver lock on object storage needs (create-if-absent, replace only with a matching ETag) and read-only credentials."""

import obstore
import pytest
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, PreconditionError
from obstore.store import S3Store

from support.seaweed import start_seaweed


@pytest.fixture(scope="module")
def s3():
    server = start_seaweed()
    yield server
    server.stop()


def _store(server, who="admin", bucket="mnkpipe-test"):
    env = server.env(who)
    return S3Store(bucket, endpoint=env["AWS_ENDPOINT_URL"], access_key_id=env["AWS_ACCESS_KEY_ID"],
                   secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"],
                   client_options={"allow_http": True})


def test_conditional_writes_are_honoured(s3):
    st = _store(s3)
    first = obstore.put(st, "lock", b"one", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(st, "lock", b"two", mode="create")
    with pytest.raises(PreconditionError):
        obstore.put(st, "lock", b"three", mode={"e_tag": '"not-the-etag"'})
    obstore.put(st, "lock", b"four", mode={"e_tag": first["e_tag"]})
    assert bytes(obstore.get(st, "lock").bytes()) == b"four"


def test_reader_identity_reads_but_cannot_write(s3):
    obstore.put(_store(s3), "shared", b"data")
    ro = _store(s3, "reader")
    assert bytes(obstore.get(ro, "shared").bytes()) == b"data"
    with pytest.raises(PermissionDeniedError):
        obstore.put(ro, "other", b"x")


def test_two_servers_run_side_by_side(s3):
    other = start_seaweed(bucket="mnkpipe-other")
    try:
        assert other.endpoint != s3.endpoint
        obstore.put(_store(other, bucket="mnkpipe-other"), "k", b"v")
    finally:
        other.stop()
    assert other.proc.poll() is not None and not other.folder.exists()
