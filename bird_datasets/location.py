"""Where a dataset URI points: the one resolver the API, the worker and the CLI share.

A dataset is named by

* ``s3://bucket/prefix`` — on the deployment's S3 endpoint, with its credentials (``Settings``);
* ``file:///abs/dir`` or a local path — a directory;
* a relative name such as ``datasets/fmnist`` — a prefix inside the deployment's store (job
  specs, which the API and the worker read), or a local directory when there is no deployment
  store (commands run on a workstation: ``bird datasets validate ./fmnist``).

In a deployment, names are a tenant's: a job of tenant 7 naming ``datasets/fmnist`` reads
``tenants/7/datasets/fmnist`` (:func:`tenant_prefix`), and ``shared/...`` names the read-only
data an operator published for everyone. Absolute paths, ``file://`` and ``s3://`` URIs reach
past every tenant's space (any file of the machine, any bucket the deployment's credentials
reach), so a deployment refuses them unless ``Settings.allow_external_uris`` is set (a
single-user install). The refusal is decided from the URI's form alone, before any read, so it
says nothing about what exists there. Teacher weights (``teacher.weights_uri``) follow the same
rules (:func:`resolve_tenant_key`).

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

__all__ = [
    "SHARED_PREFIX",
    "DatasetURIError",
    "external_refused",
    "is_external_uri",
    "resolve_dataset_uri",
    "resolve_tenant_key",
    "tenant_prefix",
]

# Read-only data an operator publishes for every tenant (``shared/datasets/<name>``,
# ``shared/teachers/<name>``); tenants name it as it is.
SHARED_PREFIX = "shared"


class DatasetURIError(DatasetError):
    """A dataset URI that cannot name a dataset location (bad scheme, bucket or prefix)."""


def tenant_prefix(tenant_id: int) -> str:
    """The prefix of the deployment's store that holds tenant ``tenant_id``'s own data."""
    return f"tenants/{int(tenant_id)}"


def is_external_uri(uri: str) -> bool:
    """Whether ``uri`` names something outside the deployment's store by its form alone: a
    URI with a scheme (``s3://``, ``file://``, ...) or an absolute path."""
    return "://" in uri or uri.startswith(("/", "\\")) or (len(uri) > 1 and uri[1] == ":")


def external_refused(what: str, uri: str, example: str) -> str:
    """The one message for a URI refused by its form (:func:`is_external_uri`)."""
    return (
        f"{what} {uri!r} is refused: name one of your own ({example}) or a shared one "
        "(shared/...); absolute paths, file:// and s3:// URIs are not accepted by this deployment"
    )


def resolve_tenant_key(uri: str, tenant_id: int | None) -> str:
    """The key in the deployment's store that the relative name ``uri`` of tenant
    ``tenant_id`` names: ``shared/...`` as it is, anything else under the tenant's own
    prefix. ``tenant_id`` None (operators' tools) takes ``uri`` as a key from the store's root.

    Raises :class:`~service.storage.InvalidKeyError` for a name that is not a valid key (an
    absolute path among them: callers refuse those first, see :func:`is_external_uri`).
    """
    key = validate_prefix(uri)
    if tenant_id is None or key == SHARED_PREFIX or key.startswith(SHARED_PREFIX + "/"):
        return key
    return f"{tenant_prefix(tenant_id)}/{key}"


def resolve_dataset_uri(
    uri: str,
    settings: Settings,
    store: ObjectStore | None = None,
    *,
    tenant_id: int | None = None,
    opener: Callable[[str], ObjectStore] | None = None,
) -> tuple[ObjectStore, str]:
    """The store and prefix the dataset URI ``uri`` names.

    ``store`` is the deployment's store: a relative ``uri`` is a prefix inside it, in the
    space of ``tenant_id`` (:func:`resolve_tenant_key`), and absolute paths, ``file://`` and
    ``s3://`` URIs are refused unless ``settings.allow_external_uris``. Without ``store`` (a
    workstation) a relative ``uri`` is a local directory. ``s3://`` and local URIs open a store
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
    if store is not None and not settings.allow_external_uris and is_external_uri(uri):
        raise DatasetURIError(external_refused("dataset URI", uri, "datasets/<name>"), uri)
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
        return store, resolve_tenant_key(uri, tenant_id)
    except DatasetURIError:
        raise
    except (InvalidKeyError, StorageError) as exc:
        raise invalid(str(exc)) from None
