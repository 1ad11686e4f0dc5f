"""Data files shipped inside the package: the profiles and the API's .proto.

In a checkout ``pals_daemon/profiles`` and ``pals_daemon/proto`` are symlinks to the top-level ``profiles/``
and ``proto/``; a wheel carries copies (pyproject.toml's package-data), so an installed daemon finds them
with importlib.resources wherever it runs from. The package must be installed as files (not imported from
a zip), which is what pip does.
"""

from __future__ import annotations

import pathlib
from importlib import resources


def _package_path(*parts: str) -> pathlib.Path:
    return pathlib.Path(str(resources.files("pals_daemon").joinpath(*parts)))


def profiles_dir() -> pathlib.Path:
    """The profiles shipped with the package (``profiles/`` of the checkout in an editable install)."""
    return _package_path("profiles")


def proto_path() -> pathlib.Path:
    """The API definition ``pals/v1/pals.proto`` (for grpcurl/grpc_cli ``-proto``, or code generation)."""
    return _package_path("proto", "pals", "v1", "pals.proto")
