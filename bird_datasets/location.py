"""Where a dataset URI points: the one resolver the API, the worker and the CLI share.

A dataset is named by

* ``s3://bucket/prefix`` — on the deployment's S3 endpoint, with its credentials (``Settings``);
* ``file:///abs/dir`` or a local path — a directory;
* a relative name such as ``datasets/fmnist`` — a prefix inside the deployment's store (job
  specs, which the API and the worker read), or a local directory when there is no deployment
  store (commands run on a workstation: ``bird datasets validate ./fmnist``).

:func:`resolve_dataset_uri` turns one into ``(store, prefix)``; whatever it refuses raises
:class:`DatasetURIError` with one message for every caller: the API answers it as a 422 on
``dataset.uri``, the worker fails the job with it, the CLI prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from bird_datasets.format import DatasetError
from service.settings import Settings
from service.storage import (
    InvalidKeyError,
    ObjectStore,
    StorageError,
    open_store,
    valid_bucket_name,
    validate_prefix,
)

__all__ = ["DatasetURIError", "resolve_dataset_uri"]


class DatasetURIError(DatasetError):
    """A dataset URI that cannot name a dataset location (bad scheme, bucket or prefix)."""


def resolve_dataset_uri(
    uri: str,
    settings: Settings,
    store: ObjectStore | None = None,
    *,
    opener: Callable[[str], ObjectStore] | None = None,
) -> tuple[ObjectStore, str]:
    """The store and prefix the dataset URI ``uri`` names.

    ``store`` is the deployment's store: a relative ``uri`` is a prefix inside it. Without
    ``store`` a relative ``uri`` is a local directory. ``s3://`` and local URIs open a store
    of their own, rooted at the dataset (the prefix is then ``""``), with ``opener`` (default:
    :func:`service.storage.open_store` with ``settings``; the API passes one that caches
    stores).
    """
    open_url = opener or (lambda url: open_store(url, settings))

    def invalid(reason: str) -> DatasetURIError:
        return DatasetURIError(f"dataset URI {uri!r} is invalid: {reason}", uri)

    if not isinstance(uri, str) or not uri:
        raise invalid("it is empty")
    if "\x00" in uri:
        raise invalid("it must not contain NUL characters")
    try:
        if "://" in uri:
            parsed = urlparse(uri)
            scheme = parsed.scheme.lower()
            if scheme == "s3":
                if not valid_bucket_name(parsed.netloc):
                    raise invalid(f"{parsed.netloc!r} is not a valid S3 bucket name")
                prefix = validate_prefix(parsed.path.lstrip("/"))
                return open_url(f"s3://{parsed.netloc}/{prefix}".rstrip("/")), ""
            if scheme == "file":
                if parsed.netloc not in ("", "localhost"):
                    raise invalid("file URIs must name a local path")
                path = unquote(parsed.path)
                if not path.startswith("/"):
                    raise invalid("file URIs must name an absolute path")
                return open_url(str(Path(path))), ""
            raise invalid(
                f"unsupported scheme {parsed.scheme!r}: use s3://bucket/prefix, a local path, "
                "or a prefix in the deployment's store"
            )
        if uri.startswith("/") or store is None:
            return open_url(str(Path(uri))), ""
        return store, validate_prefix(uri)
    except DatasetURIError:
        raise
    except (InvalidKeyError, StorageError) as exc:
        raise invalid(str(exc)) from None
