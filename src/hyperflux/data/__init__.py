"""Data sets the paper trains on, behind one registry a recipe can name, all readable without internet.

`load(name, root)` gives a `DataBundle` (both splits, num_classes, in_channels, image_size, loaders);
`fetch(name)` puts a data set into the cache (`~/.cache/hyperflux`, or $HYPERFLUX_DATA), verified;
every missing, truncated or corrupt file raises `DataError` with a one-line message that says how to get it.
"""

from hyperflux.data.cache import cache_dir, fetch
from hyperflux.data.folder import FolderLoader, FolderSet
from hyperflux.data.registry import DataBundle, load, names
from hyperflux.data.sets import BatchLoader, DataError, ImageSet, RandomCropFlip

__all__ = [
    "BatchLoader",
    "DataBundle",
    "DataError",
    "FolderLoader",
    "FolderSet",
    "ImageSet",
    "RandomCropFlip",
    "cache_dir",
    "fetch",
    "load",
    "names",
]
