"""The Zarr layout of an experiment (images, scale maps, episodes, tiled Gram, tile records, manifest, lock), on a
local folder or an S3-compatible object store."""

from .layout import CREATION_MARKER, Store, create_store, describe_differences, is_being_created, open_store
from .lock import StoreLock, StoreLockedError
from .paths import store_folder, store_location
from .storage import LocalStorage, ObjectStorage, open_storage
from .tiled import (RECORD_FILL, RECORD_REPAIR, StoreError, TiledArray, add_tiled_array, find_tiled_arrays,
                    n_blocks, plan_digest, symmetric_block, tile_crc)

__all__ = ["CREATION_MARKER", "RECORD_FILL", "RECORD_REPAIR", "LocalStorage", "ObjectStorage", "Store", "StoreError",
           "StoreLock", "StoreLockedError", "TiledArray", "add_tiled_array", "create_store", "describe_differences",
           "find_tiled_arrays", "is_being_created", "n_blocks", "open_storage", "open_store", "plan_digest",
           "store_folder", "store_location", "symmetric_block", "tile_crc"]
