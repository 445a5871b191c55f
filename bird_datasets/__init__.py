"""Datasets in the bird format (Parquet parts plus a manifest), the one home of "dataset".

============================  ===============================================================
:mod:`bird_datasets.format`       columns, schema, :class:`DatasetMeta`, ``parse_metadata``,
                                  the errors
:mod:`bird_datasets.codec`        the image encoder/decoder and its one channel rule
:mod:`bird_datasets.writer`       ``DatasetWriter``, ``write_dataset``
:mod:`bird_datasets.reader`       ``read_dataset``, ``read_dataset_meta``, ``split_arrays``,
                                  ``check_table``
:mod:`bird_datasets.validation`   ``validate_dataset``, ``ValidationReport``
:mod:`bird_datasets.describe`     ``describe_dataset``, ``render_description``
:mod:`bird_datasets.fingerprint`  ``dataset_fingerprint``: the identity of a dataset's rows
:mod:`bird_datasets.location`     ``resolve_dataset_uri``: a dataset URI → (store, prefix)
:mod:`bird_datasets.converters`   converters from public datasets, in a registry by name
============================  ===============================================================

Import what you use from its module. This file imports nothing on purpose: Ray Data tasks
import :mod:`bird_datasets.codec` and must not pay for boto3 (the store), torch (the
converters) or anything else. Outside ``converters/`` the package needs only numpy, pyarrow,
Pillow and the base layer of the service (``service.storage``, ``service.settings``).
"""
