"""The Zarr layout of an experiment: images, scale maps, episodes, tiled Gram, tile records, manifest, lock."""

from .layout import (RECORD_FILL, Store, StoreError, add_tiled_array, create_store, describe_differences, open_store,
                     tile_crc)
from .lock import StoreLock, StoreLockedError
from .tiled import TiledGroup

__all__ = ["RECORD_FILL", "Store", "StoreError", "StoreLock", "StoreLockedError", "TiledGroup", "add_tiled_array",
           "create_store", "describe_differences", "open_store", "tile_crc"]
