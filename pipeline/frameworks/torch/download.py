"""The standard datasets' files fetched with torchvision's downloader: the `fetch` that ingest
hands the data layer (which imports no framework) for `data.download`."""

from __future__ import annotations

import socket
from pathlib import Path

from pipeline.data import formats
from pipeline.data.sources import standard


def fetch(name: str, root: Path) -> None:
    """Fetch both official splits of `name` into `root`."""
    if name not in standard.STANDARD:
        raise formats.DataError(f"no download for {name!r}; downloadable: {list(standard.STANDARD)}")
    import torchvision.datasets  # here, not at the top: seconds to import and needed only to fetch

    dataset = getattr(torchvision.datasets, standard.TORCHVISION[name])
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # without a network, fail in seconds rather than hang on each mirror
    try:
        for train in (True, False):
            dataset(str(root), train=train, download=True)
    finally:
        socket.setdefaulttimeout(previous)
