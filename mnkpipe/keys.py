"""Keys of settings: the bottom layer (imports nothing from mnkpipe), so every layer names derived data one way."""

import hashlib
import json


def settings_key(obj, n: int = 16) -> str:
    """The first n hex digits of sha256 over obj as JSON with sorted keys: equal settings, equal key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]
