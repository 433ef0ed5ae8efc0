"""Model specs -> open_clip models, tokenizers and transforms. The one factory every command uses.

A spec is ``--model NAME --pretrained TAG|PATH``:
  - ``ViT-B-32 --pretrained openai``        an open_clip architecture and a pretrained tag
  - ``ViT-B-32 --pretrained /path/w.safetensors``  a local checkpoint
  - ``hf-hub:org/repo`` / ``local-dir:/path``      open_clip's own schemas (pretrained ignored)
  - ``vlmtools-tiny --pretrained none``      packaged test architectures, random weights (seed 0)
  - ``vlmtools-micro``                       the micro CLIP of the offline world, weights shipped in
                                             the package (``--pretrained vlmtools``, the default for it)
torch and open_clip are imported inside functions so that ``vlmtools --help`` starts fast.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtools.errors import BadInput, ModelUnavailable, StoreMismatch

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
PACKAGED_TAG = "vlmtools"  # pretrained tag meaning "weights shipped in vlmtools/weights/"
RANDOM_TAGS = ("none", "random", "")
# fp32: float32 weights, no autocast. fp16: half weights as OpenAI's clip.load on CUDA (what Menon &
# Vondrick ran; open_clip's precision="fp16": linear/conv/attention weights in half, LayerNorm in float32).
# bf16: float32 weights under bfloat16 autocast (CPU and CUDA). amp: the device's autocast (bf16, else
# fp16, on CUDA; none on CPU).
PRECISIONS = ("fp32", "fp16", "bf16", "amp")
DEFAULT_PRECISION = "amp"


def packaged_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}


def packaged_weights(name: str) -> Path | None:
    path = WEIGHTS_DIR / f"{name}.safetensors"
    return path if path.exists() else None


@dataclass(frozen=True)
class ModelSpec:
    name: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED

    @classmethod
    def parse(cls, name: str | None, pretrained: str | None = None) -> "ModelSpec":
        """Resolve CLI arguments; ``pretrained=None`` means the default for that model."""
        name = name or DEFAULT_MODEL
        if name.startswith(("hf-hub:", "local-dir:")):
            return cls(name, None)
        check_model_name(name)
        if pretrained is None:
            if name in packaged_configs():
                pretrained = PACKAGED_TAG if packaged_weights(name) else "none"
            else:
                pretrained = DEFAULT_PRETRAINED
        if pretrained.lower() in RANDOM_TAGS:
            pretrained = "none"
        elif os.path.sep in pretrained or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth")):
            pretrained = str(Path(pretrained).expanduser().resolve())
        return cls(name, pretrained)

    def as_dict(self) -> dict:
        return {"name": self.name, "pretrained": self.pretrained}

    def __str__(self) -> str:
        return self.name if self.pretrained is None else f"{self.name} (pretrained={self.pretrained})"

    def check_matches(self, recorded: dict, where: str) -> None:
        """Refuse to mix embedding spaces: ``recorded`` is a store's info["model"]."""
        if recorded.get("name") != self.name or recorded.get("pretrained") != self.pretrained:
            other = ModelSpec(recorded.get("name", "?"), recorded.get("pretrained"))
            raise StoreMismatch(
                f"{where} was embedded with {other}, not {self}. Embeddings of different models live in "
                f"different spaces; pass --model {other.name}"
                + (f" --pretrained {other.pretrained}" if other.pretrained else "")
                + " or re-embed with this model.")


def known_model_names() -> list[str]:
    """Packaged and open_clip architecture names, read from the config files without importing open_clip
    (which takes seconds): the completer and the did-you-mean check use them before any load."""
    import importlib.util

    names = list(packaged_configs())
    found = importlib.util.find_spec("open_clip")
    if found is not None and found.origin:
        names += sorted(p.stem for p in (Path(found.origin).parent / "model_configs").glob("*.json"))
    return names


def check_model_name(name: str) -> None:
    """Refuse an unknown architecture at once, with the closest known names."""
    if spec_is_schema(name):
        return
    known = known_model_names()
    if name in known or not known:
        return
    import difflib

    lower = {k.lower(): k for k in known}
    close = [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise BadInput(f"unknown model {name!r}{hint} (`vlmtools models --all` lists them; hf-hub:ORG/REPO and "
                   f"local-dir:PATH name others)")


def spec_for_store(recorded: dict, model: str | None = None, pretrained: str | None = None) -> ModelSpec:
    """The model to use with a store: the one it records (``recorded`` = info["model"]) unless the user
    names one, which must then match it. ``--model NAME`` alone means "the store's weights of NAME"."""
    store_spec = ModelSpec(recorded["name"], recorded.get("pretrained"))
    if model is None and pretrained is None:
        return store_spec
    if pretrained is None and (model is None or model == store_spec.name):
        pretrained = store_spec.pretrained
    spec = ModelSpec.parse(model or store_spec.name, pretrained)
    spec.check_matches(recorded, "the store")
    return spec


def gpu_driver_present() -> bool:
    """Whether this machine may have a GPU that torch can use: on Linux an NVIDIA driver
    (/proc/driver/nvidia, /dev/nvidiactl) or ROCm's /dev/kfd; on macOS never (torch has no CUDA there);
    elsewhere assume so. Without one, torch.cuda.is_available() is False, so --device auto can mean cpu
    without importing torch (1-2 s, 600 MiB): commands that read every embedding from stores stay light."""
    import sys

    if sys.platform == "darwin":
        return False
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd"))


def resolve_device(device: str = "auto") -> str:
    import sys

    if device == "cpu" or (device == "auto" and "torch" not in sys.modules and not gpu_driver_present()):
        return "cpu"
    if device != "auto" and not device.startswith("cuda"):
        raise BadInput(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise BadInput(f"--device {device}: CUDA is not available on this machine (try --device cpu)")
    if ":" in device and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
        raise BadInput(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def compute_precision(precision: str, device: str) -> str:
    """What ``precision`` means on ``device`` (already resolved): fp32, fp16 or bf16."""
    if precision not in PRECISIONS:
        raise BadInput(f"--precision {precision!r}: expected one of {'|'.join(PRECISIONS)}")
    if precision != "amp":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# A packaged config may hold a top-level "vlmtools" section for what open_clip's configs cannot say (a
# convolutional stem in place of the ViT's patch embedding); open_clip must not see it.
EXTRAS_KEY = "vlmtools"
# Packaged weights may store only the token-embedding rows training changed ("token_embedding.rows" lists
# them); every other row is this fixed draw, which training starts from (normal, std 0.02, as open_clip's
# init). A 49,408-token vocabulary of which the world uses a few hundred then costs kilobytes, not 10 MB.
TOKEN_BASE_SEED = 49408
TOKEN_ROWS_KEY = "token_embedding.rows"


def packaged_extras(name: str) -> dict:
    path = packaged_configs().get(name)
    return json.loads(path.read_text()).get(EXTRAS_KEY, {}) if path is not None else {}


def config_preprocess(spec: ModelSpec):
    """The eval transform open_clip builds for ``spec``, made from its configs alone (model config, pretrained
    tag), without building the model: what image decode workers need, so that they can start while the
    model loads. None where only the model knows (hf-hub:, local-dir:, a config without an image size);
    callers compare it with the loaded model's transform and use that one where they differ."""
    if spec_is_schema(spec.name):
        return None
    _register_packaged_configs()
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    config = open_clip.get_model_config(spec.name) or {}
    size = config.get("vision_cfg", {}).get("image_size")
    if size is None:
        return None
    cfg = asdict(PreprocessCfg())
    tag = spec.pretrained
    if tag and tag not in ("none", PACKAGED_TAG) and os.path.sep not in tag:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(spec.name, tag) or {})
    cfg["size"] = size
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def _register_packaged_configs() -> None:
    import open_clip

    if "vlmtools-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
        from open_clip import factory

        for name in packaged_configs():  # get_model_config() hands out deep copies of this registry
            factory._MODEL_CONFIGS.get(name, {}).pop(EXTRAS_KEY, None)


def apply_extras(model, name: str):
    """Give a freshly created open_clip model of a packaged config what its "vlmtools" section adds
    (in place; returns the model). ``conv_stem: [[channels, stride], ...]``: the ViT's patch embedding
    (conv1, one patch-size convolution) becomes 3x3 convolutions with group norms and GELUs through those
    channels and strides, then a stride-2 3x3 convolution to the tower's width, down to the same token grid (Xiao et
    al. 2021, "Early convolutions help transformers see better"): a tiny ViT with plain patches stayed
    at chance on shape here. ``pool: avg`` pools the tokens by their mean instead of the class token."""
    from torch import nn

    extras = packaged_extras(name)
    stem = extras.get("conv_stem")
    visual = model.visual
    if stem:
        patch = visual.conv1.kernel_size[0]
        stride = 2 * math.prod(s for _, s in stem)
        if stride != patch:
            raise ValueError(f"{name}: conv_stem {stem} makes stride {stride}, the patch size is {patch}")
        layers, c_in = [], 3
        for c_out, s in stem:  # conv, group norm (no train/eval difference, unlike batch norm), GELU
            layers += [nn.Conv2d(c_in, c_out, 3, s, 1, bias=False), nn.GroupNorm(8, c_out), nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, visual.conv1.out_channels, 3, 2, 1, bias=False))
        visual.conv1 = nn.Sequential(*layers).to(visual.conv1.weight.dtype)
    if extras.get("pool"):
        visual.pool_type = extras["pool"]
    return model


def base_token_embedding(vocab: int, width: int):
    """The fixed token-embedding rows (float16 torch tensor) that compact packaged weights leave out."""
    import numpy as np
    import torch

    rows = np.random.default_rng(TOKEN_BASE_SEED).standard_normal((vocab, width), dtype=np.float32) * 0.02
    return torch.from_numpy(rows).half()


def compact_state(state: dict) -> dict:
    """A float16 state dict with only the token-embedding rows that differ from base_token_embedding."""
    import torch

    weight = state["token_embedding.weight"]
    changed = (weight != base_token_embedding(*weight.shape)).any(dim=1).nonzero().flatten()
    out = dict(state)
    out["token_embedding.weight"] = weight[changed].contiguous()
    out[TOKEN_ROWS_KEY] = changed.to(torch.int64)
    return out


def expand_state(state: dict, vocab: int) -> dict:
    """compact_state undone: the full token embedding, the listed rows put back onto the base."""
    if TOKEN_ROWS_KEY not in state:
        return state
    out = dict(state)
    rows, kept = out.pop(TOKEN_ROWS_KEY), out["token_embedding.weight"]
    full = base_token_embedding(vocab, kept.shape[1]).to(kept.dtype)
    full[rows.long()] = kept
    out["token_embedding.weight"] = full
    return out


def create_packaged_model(name: str, seed: int = 0):
    """A packaged architecture with random weights from ``seed`` (extras applied; the token embedding
    starts at base_token_embedding when the config says "compact_tokens"), fp32, in train mode."""
    import torch

    _register_packaged_configs()
    import open_clip

    torch.manual_seed(seed)
    with _quiet_loggers():
        model = apply_extras(open_clip.create_model(name, pretrained=None), name)
    if packaged_extras(name).get("compact_tokens"):
        with torch.no_grad():
            model.token_embedding.weight.copy_(base_token_embedding(*model.token_embedding.weight.shape).float())
    return model


def _hf_cache_dir() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def _offline_help(spec: ModelSpec, cause: BaseException) -> str:
    detail = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
    return (
        f"cannot load weights for {spec}: they are not cached here and could not be downloaded ({detail})\n"
        f"  looked in the Hugging Face cache {_hf_cache_dir()} (and open_clip's download locations); "
        f"the network could not supply them.\n"
        f"  fix: download once on a machine with network access and copy the cache here "
        f"(set HF_HUB_CACHE or HF_HOME to it, and HF_HUB_OFFLINE=1 to skip network checks), or pass a local "
        f"checkpoint with --pretrained /path/to/weights.safetensors, or --model local-dir:/path/to/model_dir.\n"
        f"  offline tests and demos can use --model vlmtools-micro (shipped weights) or "
        f"--model vlmtools-tiny --pretrained none (random weights).")


class Encoder:
    """An open_clip model ready to encode: preprocess transform, tokenizer, device and precision
    (``precision`` as asked, one of PRECISIONS; ``compute`` what it means here: fp32, fp16 or bf16).
    The model must have been built for the precision (load_model does: fp16 weights for fp16)."""

    def __init__(self, spec: ModelSpec, model, preprocess, tokenizer, device: str,
                 precision: str = DEFAULT_PRECISION):
        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.compute = compute_precision(precision, device)

    def precision_info(self) -> dict:
        """What stores and predictions record: {"precision": as asked, "compute": as run}."""
        return {"precision": self.precision, "compute": self.compute}

    @property
    def embed_dim(self) -> int:
        import torch

        with torch.no_grad():
            return int(self.encode_texts(["a"]).shape[1])

    @property
    def image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def autocast(self):
        """bf16 autocast, or amp's autocast on CUDA; nothing for fp32 and fp16 (half weights)."""
        import contextlib

        import torch

        if self.precision == "fp16" or self.compute == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.compute == "bf16" else torch.float16
        return torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=dtype)

    def encode_image_tensor(self, images):
        """images: a preprocessed float tensor batch -> L2-normalized float32 torch tensor on CPU."""
        import torch

        dtype = torch.float16 if self.precision == "fp16" else None  # half weights take half inputs
        with torch.inference_mode(), self.autocast():
            feats = self.model.encode_image(images.to(self.device, dtype=dtype, non_blocking=True))
        feats = feats.float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu()

    def encode_texts(self, texts: list[str], batch_size: int = 256):
        """Texts -> L2-normalized float32 numpy array (N, dim)."""
        import numpy as np
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            with torch.inference_mode(), self.autocast():
                feats = self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def encode_text_tokens(self, texts: list[str], batch_size: int = 256):
        """Texts -> (token features (N, L, width) float16 numpy, mask (N, L) bool): the text tower's last
        hidden states after ln_final, before pooling and projection (what a Q-Former attends to). L is
        the longest tokenized text; mask marks real tokens. Only CLIP-style text towers have them."""
        import numpy as np

        feats, masks = [], []
        for start in range(0, len(texts), batch_size):
            x, mask = self.text_token_features(texts[start:start + batch_size])
            feats.append(x.float().cpu().numpy().astype(np.float16))
            masks.append(mask.cpu().numpy())
        if not feats:
            return np.zeros((0, 1, 1), np.float16), np.zeros((0, 1), bool)
        length = max(f.shape[1] for f in feats)
        pad = [((0, 0), (0, length - f.shape[1]), (0, 0)) for f in feats]
        return (np.concatenate([np.pad(f, p) for f, p in zip(feats, pad)]),
                np.concatenate([np.pad(m, p[:2]) for m, p in zip(masks, pad)]))

    def text_token_features(self, texts: list[str]):
        """One batch of texts -> (token features (B, L, width), mask (B, L) bool) as torch tensors on the
        device, without gradients; L is the batch's longest tokenized text (the tower's causal attention
        makes a token's features independent of the padding after it)."""
        import torch

        m = self.model
        if not all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
            raise BadInput(f"{self.spec}: its text tower does not expose token features (a CLIP-style "
                           f"transformer is needed for this)")
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.no_grad(), self.autocast():
            cast = m.transformer.get_cast_dtype()
            x = m.token_embedding(tokens).to(cast) + m.positional_embedding.to(cast)
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        mask = tokens != 0
        length = max(1, int(mask.any(dim=0).nonzero().max()) + 1) if bool(mask.any()) else 1
        return x[:, :length], mask[:, :length]

    def preprocess_description(self) -> str:
        return repr(self.preprocess).replace("\n", " ")


# Models kept loaded by keep_loaded(): (name, pretrained, device, precision) -> Encoder, least recently
# used first; None outside keep_loaded().
_kept: dict | None = None
_kept_limit = 2


@contextmanager
def keep_loaded(limit: int = 2):
    """Within the block, load_model returns the model already built for the same spec, device and precision
    instead of loading it again (`vlmtools batch`: many commands, one process); at most ``limit`` models
    stay loaded, the least recently used one is dropped first."""
    global _kept, _kept_limit
    saved = _kept, _kept_limit
    _kept, _kept_limit = ({} if _kept is None else _kept), limit
    try:
        yield
    finally:
        _kept, _kept_limit = saved


def load_model(spec: ModelSpec, device: str = "auto", precision: str = DEFAULT_PRECISION) -> Encoder:
    """Build the model for ``spec`` at ``precision`` (PRECISIONS); raise ModelUnavailable with an
    actionable message on failure. Inside keep_loaded(), a model built before is returned as it is."""
    if _kept is None:
        return _load_model(spec, device, precision)
    key = (spec.name, spec.pretrained, resolve_device(device), precision)
    encoder = _kept.pop(key, None) or _load_model(spec, device, precision)
    _kept[key] = encoder
    while len(_kept) > _kept_limit:
        _kept.pop(next(iter(_kept)))
    return encoder


def _load_model(spec: ModelSpec, device: str, precision: str) -> Encoder:
    from vlmtools.console import loading

    loading(f"model {spec}")
    import torch

    _register_packaged_configs()
    import open_clip

    device = resolve_device(device)
    compute_precision(precision, device)  # BadInput before any loading
    from vlmtools.console import debug

    debug(f"model {spec.name}: pretrained {spec.pretrained or 'from its schema'}, device {device}, "
          f"precision {precision}")
    schema = spec.name.split(":", 1)[0] + ":" if spec.name.startswith(("hf-hub:", "local-dir:")) else None
    if schema is None and spec.name not in open_clip.list_models():
        raise BadInput(f"unknown model {spec.name!r}; `vlmtools models` lists the available ones")
    if schema == "local-dir:" and not Path(spec.name[len("local-dir:"):]).is_dir():
        raise ModelUnavailable(f"--model {spec.name}: no such directory")

    pretrained = spec.pretrained
    weights_file = None
    if pretrained == PACKAGED_TAG:
        weights_file = packaged_weights(spec.name)
        if weights_file is None:
            raise ModelUnavailable(f"{spec.name} has no weights shipped with vlmtools; use --pretrained none")
        pretrained = None
    elif pretrained == "none":
        pretrained = None
    elif (pretrained is not None and pretrained.endswith(".safetensors") and Path(pretrained).is_file()
          and spec.name in packaged_configs()):
        # our own checkpoints of our architectures (train_micro's output) load as the shipped ones do:
        # after the extras are applied, compact token rows expanded
        weights_file, pretrained = Path(pretrained), None
    elif pretrained is not None and os.path.sep in pretrained and not Path(pretrained).exists():
        raise ModelUnavailable(f"--pretrained {pretrained}: no such file")
    elif (schema is None and pretrained is not None and os.path.sep not in pretrained
          and not open_clip.pretrained.is_pretrained_cfg(spec.name, pretrained)):
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        raise BadInput(f"{spec.name} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'}")

    if pretrained is None:
        # Random weights are reproducible: seed a private generator state, restore the caller's after.
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(0)
    elif schema != "local-dir:" and os.path.sep not in pretrained:
        _fail_fast_if_offline(spec)
    if schema == "hf-hub:":
        _fail_fast_if_offline(spec)
    try:
        with _quiet_loggers():
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name, pretrained=pretrained, device="cpu",
                precision="fp16" if precision == "fp16" else "fp32")
            if schema is None:  # inside the seeded block: a stem's random weights are reproducible too
                apply_extras(model, spec.name)
    except Exception as exc:
        if pretrained is not None and Path(pretrained).is_file():
            # torch's own message here advises weights_only=False, i.e. unpickling an untrusted file: never
            raise BadInput(f"--pretrained {pretrained}: not a checkpoint of {spec.name} that can be loaded "
                           f"safely ({type(exc).__name__}); pass a state-dict file (.safetensors, .pt, .bin) "
                           f"written for this model") from None
        if isinstance(exc, (RuntimeError, OSError, ValueError)):
            raise ModelUnavailable(_offline_help(spec, exc)) from None
        # huggingface_hub / requests errors when offline
        if type(exc).__module__.startswith(("huggingface_hub", "requests", "urllib3", "httpx")):
            raise ModelUnavailable(_offline_help(spec, exc)) from None
        raise
    finally:
        if pretrained is None:
            torch.random.set_rng_state(rng_state)
    if weights_file is not None:
        from safetensors.torch import load_file

        shipped = spec.pretrained == PACKAGED_TAG
        try:
            state = expand_state(load_file(str(weights_file)), model.token_embedding.weight.shape[0])
            missing, unexpected = model.load_state_dict(state, strict=False)
        except Exception as exc:  # a damaged file, or tensors of the wrong shapes
            missing, unexpected = [f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"], []
        if missing or unexpected:
            what = f"shipped weights {weights_file}" if shipped else f"--pretrained {weights_file}"
            error = ModelUnavailable if shipped else BadInput
            raise error(f"{what} do not match the {spec.name} config (missing {len(missing)}, unexpected "
                        f"{len(unexpected)} tensors{'; ' + missing[0] if missing else ''})")
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(spec.name)
    return Encoder(spec, model, preprocess, tokenizer, device, precision)


@contextmanager
def _quiet_loggers():
    """open_clip logs warnings through the root logger and huggingface_hub retries noisily; our errors
    say what matters, so hush both while a model loads (and restore the caller's levels after)."""
    import logging

    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _fail_fast_if_offline(spec: ModelSpec) -> None:
    """Without network and cache, huggingface_hub retries for ~45 s; tell the user at once instead."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return  # huggingface_hub will look in the cache only, and fail fast itself
    if _is_cached(spec.name, spec.pretrained):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy decides what is reachable: let huggingface_hub try
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=3).close()
    except OSError as exc:
        raise ModelUnavailable(_offline_help(spec, exc)) from None


def available_models() -> list[dict[str, Any]]:
    """Model specs known to this install: packaged ones first, then open_clip's pretrained tags,
    with whether their weights are cached locally."""
    _register_packaged_configs()
    import open_clip

    rows = []
    for name in packaged_configs():
        w = packaged_weights(name)
        rows.append({"model": name, "pretrained": PACKAGED_TAG if w else "none", "cached": True,
                     "source": "vlmtools"})
    for name, tag in open_clip.list_pretrained():
        rows.append({"model": name, "pretrained": tag, "cached": _is_cached(name, tag), "source": "open_clip"})
    return rows


def _is_cached(name: str, tag: str | None) -> bool:
    """Whether the Hugging Face cache holds the weights of this spec (an hf-hub: repo, or a tag's hub repo)."""
    if name.startswith("hf-hub:"):
        hub_id = name[len("hf-hub:"):].split("@")[0]
    elif spec_is_schema(name) or not tag:
        return False
    else:
        import open_clip

        hub_id = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "").rstrip("/")
    if hub_id.count("/") != 1:
        return False
    from huggingface_hub import try_to_load_from_cache

    # the weight files open_clip fetches from a hub repo; a snapshot with only a config is not enough
    return any(isinstance(try_to_load_from_cache(hub_id, name, cache_dir=_hf_cache_dir()), str)
               for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))


def spec_is_schema(name: str) -> bool:
    return name.startswith(("hf-hub:", "local-dir:"))


def config_of(name: str) -> dict:
    path = packaged_configs().get(name)
    if path is None:
        raise BadInput(f"no packaged config {name!r}")
    return json.loads(path.read_text())
