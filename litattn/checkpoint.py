"""Checkpoint directories: save, load, resume.

    <dir>/model.safetensors       weights (safetensors: loading never runs pickled code)
    <dir>/model_config.yaml       Config.save
    <dir>/hyperparameters.yaml    the run's arguments (optional)
    <dir>/tokenizer.json|.model   tokenizer.save (optional), with tokenizer_fingerprint.json: loading refuses
                                  a tokenizer swapped in later
    <dir>/training_state.pt       resumable runs: optimizer, step, data position, RNG (plain data only,
                                  so torch.load(weights_only=True) reads it)

A directory is written whole or not at all: everything goes into a temp dir beside it, which is
then swapped in, so a crash mid-save never leaves a half checkpoint under the final name.
`load` also reads litgpt checkpoint directories (`lit_model.pth` + litgpt's `model_config.yaml`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import random
import re
import shutil
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from litattn.config import Config, resolve_model_config
from litattn.model import GPT, is_mechanism_parameter
from litattn.tokenizer import MODEL_FILES, Tokenizer
from litattn.utils import WriteError, atomic_write, make_temp_dir, write_failure

if TYPE_CHECKING:
    from litattn.model import GPT
    from litattn.tokenizer import Tokenizer

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"
HPARAMS_FILE = "hyperparameters.yaml"
STATE_FILE = "training_state.pt"
LITGPT_MODEL_FILE = "lit_model.pth"
_STEP_DIR = re.compile(r"step-(\d{8,})")
_BACKUP_DIR = re.compile(r"\.(.+)\.[0-9a-f]{8}\.old")
_ALIASES_KEY = "litattn.aliases"  # safetensors metadata: {dropped key: kept key} for tied tensors


def step_dir_name(step: int) -> str:
    """`step-00000100`: zero-padded so directory listings sort in training order."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------- save
def save_checkpoint(
    out_dir: Path,
    model_state: dict[str, Tensor],
    config: Config,
    tokenizer: Tokenizer | None = None,
    hyperparameters: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically (see `atomic_directory`) and return its path.

    A failed write (disk full, permissions) raises CheckpointWriteError and leaves any previous
    checkpoint of that name as it was."""
    out_dir = Path(out_dir)
    try:
        with atomic_directory(out_dir) as tmp:
            save_state_dict(model_state, tmp / MODEL_FILE)
            config.save(tmp / CONFIG_FILE)
            if hyperparameters is not None:
                (tmp / HPARAMS_FILE).write_text(yaml.safe_dump(_yaml_safe(hyperparameters), sort_keys=False))
            if tokenizer is not None:
                tokenizer.save(tmp)
            if training_state is not None:
                save_training_state(tmp, training_state)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError ("enforce fail")
        raise CheckpointWriteError(f"Could not write checkpoint {out_dir}: {write_failure(out_dir, e)}") from e
    return out_dir


class CheckpointWriteError(WriteError):
    """A checkpoint directory could not be written; the previous one of that name is untouched."""


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temp dir beside out_dir to fill; on success it replaces out_dir in one swap.

    The files are fsynced in `.<name>.<pid>.<id>.tmp/`; then an existing out_dir is renamed to a
    backup, the temp dir renamed to out_dir, and the backup deleted. A failure before the swap
    leaves the previous directory untouched; a kill between the two renames leaves it under the
    backup name, which `_recover` puts back on the next save or load.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover(out_dir)
    tmp = make_temp_dir(out_dir.parent, out_dir.name)
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_with_tokenizer(
    checkpoint_dir: Path, device=None, dtype=None, attention: dict | None = None, context: int | None = None
):
    """`load` for inference entry points: the device picked automatically, the attention spec
    optionally overridden, the accepted context optionally widened (`GPT.allow_context`), and a
    tokenizer required (generate, evaluate and visualize need one)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {"attention": attention} if attention else {}
    model, tokenizer, config = load(checkpoint_dir, device=device, dtype=dtype, **overrides)
    if context is not None:
        model.allow_context(context)
    if tokenizer is None:
        raise FileNotFoundError(
            f"{checkpoint_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer of the run "
            "that trained it into the directory"
        )
    return model, tokenizer, config


def save_state_dict(state: dict[str, Tensor], path: Path) -> None:
    """Write weights as safetensors. Tensors that alias another (tied embeddings) are stored once
    and recorded in the metadata, because safetensors refuses shared storage; `load_state_dict`
    restores them, so readers always see every key."""
    tensors, aliases = _dealias(state)
    try:
        save_file(tensors, str(path), metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases)})
    except SafetensorError as e:  # its I/O errors end in "(os error N)": report them as the OSError they are
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def _dealias(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    groups: dict[tuple, list[str]] = {}
    for key, t in state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"State dict entry {key!r} is a {type(t).__name__}, not a tensor")
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        groups.setdefault(view, []).append(key)
    tensors, aliases, storages = {}, {}, set()
    for keys in groups.values():
        # keep the embedding and alias the head (GPT-2 / Llama-3.2 style tying)
        kept, *dropped = sorted(keys, key=lambda k: (k.startswith("lm_head"), k))
        t = state[kept].detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        tensors[kept] = t.clone() if ptr in storages else t.contiguous()  # other views of one storage: copy
        storages.add(ptr)
        aliases.update(dict.fromkeys(dropped, kept))
    return tensors, aliases


def _swap_in(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
    else:
        backup = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(out_dir, backup)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(backup, out_dir)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    _fsync_dir(out_dir.parent)


def _recover(out_dir: Path) -> None:
    """Undo a swap that was killed between its two renames: put the backup back under its name."""
    if out_dir.exists() or not out_dir.parent.is_dir():
        return
    backups = sorted(out_dir.parent.glob(f".{out_dir.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if backups:
        os.replace(backups[-1], out_dir)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; renames there are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _yaml_safe(value: Any) -> Any:
    """Paths -> str, tuples -> lists, recursively: what yaml.safe_dump accepts."""
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_hyperparameters(checkpoint_dir: Path) -> dict[str, Any] | None:
    path = Path(checkpoint_dir) / HPARAMS_FILE
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------------------------- training state
_PLAIN = (Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def save_training_state(checkpoint_dir: Path, state: dict[str, Any]) -> Path:
    """Write training_state.pt. Only plain data is accepted (checked here, not at resume time),
    so that `load_training_state` can read it with weights_only=True."""
    _check_plain(state, "training_state")
    path = Path(checkpoint_dir) / STATE_FILE
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}; the training state may hold only "
            "tensors, numbers, strings, lists/tuples/dicts and None (convert it, e.g. numpy arrays with .tolist())"
        )


def load_training_state(checkpoint_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {checkpoint_dir} is not a resumable checkpoint")
    state = _torch_load(path, map_location=map_location)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a dict of training state")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG a training run draws from, as plain data (numpy's key array becomes a list)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured: the next random numbers equal those the saved run drew."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_of_dir_name(name: str) -> int | None:
    """The step of a `step-XXXXXXXX` directory name; None for any other name."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def checkpoint_step(d: Path) -> float:
    """The training step a checkpoint directory holds: from its `step-` name, else (`final/`) from its
    training state; inf when unknown (a final/ without one ranks above every step)."""
    step = step_of_dir_name(Path(d).name)
    return float(step) if step is not None else _final_step(Path(d))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete `step-XXXXXXXX/` or `final/` under out_dir (for `--resume auto`).

    Complete = has model.safetensors and training_state.pt; temp and backup dirs (dot names) never
    match. `final/` ranks by the step stored in its training state, so a finished run that was
    continued to more steps resumes from the newer step dir.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    for d in list(out_dir.iterdir()):
        if backup := _BACKUP_DIR.fullmatch(d.name):
            _recover(out_dir / backup.group(1))
    best: tuple[float, int] | None = None
    found = None
    for d in out_dir.iterdir():
        if not (d.name == "final" or step_of_dir_name(d.name) is not None) or not _is_complete(d):
            continue
        rank = (checkpoint_step(d), int(d.name == "final"))
        if best is None or rank > best:
            best, found = rank, d
    return found


def _is_complete(d: Path) -> bool:
    return d.is_dir() and (d / MODEL_FILE).is_file() and (d / STATE_FILE).is_file()


def _final_step(d: Path) -> float:
    try:  # mmap: reads the small header and the step, not the optimizer tensors
        step = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception:
        step = None
    return float("inf") if step is None else float(step)


# ---------------------------------------------------------------------------------- load
def load_state_dict(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Weights from .safetensors, or from .pth/.bin/.pt via torch.load(weights_only=True).

    A pickle that holds anything but plain tensors and containers is refused (never unpickled).
    litgpt training checkpoints ({"model": state_dict, ...}) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device)
    state = _torch_load(path, map_location=device)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    bad = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if bad:
        raise ValueError(f"{path} is not a plain state dict: entries {bad[:5]} are not tensors")
    return state


def _load_safetensors(path: Path, device) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); the checkpoint is corrupt or "
            "was only partly copied: copy it again or use another checkpoint"
        ) from None
    for dropped, kept in json.loads(metadata.get(_ALIASES_KEY, "{}")).items():
        state[dropped] = state[kept]
    return state


def _torch_load(path: Path, map_location) -> Any:
    def pickled_global() -> str | None:
        """The first global (module.name) outside torch's own that the file's pickle names: "" when it names none,
        None when the file is not one whole pickle (or a torch zip holding one). Parses opcodes, never unpickles."""
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
            else:
                data = Path(path).read_bytes()
            strings, names, end = [], [], -1
            for opcode, arg, pos in pickletools.genops(data):
                end = pos
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                if opcode.name == "STOP":
                    break
            if end != len(data) - 1:
                return None  # no STOP, or bytes after it
        except Exception:
            return None
        safe = ("torch.", "collections.OrderedDict", "collections.Counter", "_codecs.encode")
        return next((n for n in names if not n.startswith(safe)), "")

    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: the error below says it all
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refused something. Torch's wording differs between versions ("Unsupported global:
        # GLOBAL x.Y was not an allowed global", "Trying to load unsupported GLOBAL posix.system whose module
        # posix is blocked", ...), so the refused name is read from the message where it has one, else from the
        # pickle's own opcodes; a file that is no whole pickle stays "corrupt".
        found = re.search(r"\bGLOBAL\s+([A-Za-z_][\w.]*)", str(e))
        refused = found.group(1) if found else pickled_global()
        advice = "Re-save the state dict of tensors (or convert the file to safetensors) with the code that wrote it"
        if refused:
            raise ValueError(
                f"{path} holds a pickled Python object ({refused}), which litattn refuses to unpickle for safety "
                "(unpickling can run arbitrary code; only tensors and plain containers load, torch.load "
                f"weights_only=True). {advice}"
            ) from None
        if refused is not None:
            raise ValueError(
                f"{path} holds pickled data that the safe loader (torch.load weights_only=True) refuses, not tensors "
                f"saved by torch.save; litattn does not unpickle it, for safety. {advice}"
            ) from None
        raise ValueError(f"{path} is not a readable PyTorch file: it is corrupt or not a checkpoint") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a readable PyTorch file ({type(e).__name__}: {e}); it is corrupt") from None


def load(
    checkpoint_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **config_overrides: Any
) -> tuple[GPT, Tokenizer | None, Config]:
    """Model, tokenizer (None if the dir has none) and config from a checkpoint directory.

    config_overrides update model_config.yaml (e.g. attention={"name": "ssa"}: an attention
    override naming another mechanism replaces the spec). Weights load strictly, except that when
    the attention was overridden, parameters of the new mechanism (`.attn.mechanism.`) absent from
    the checkpoint keep their init, and the old mechanism's are dropped with a warning.
    dtype=None keeps the dtype the weights were saved in.
    """
    saved, weights_path, litgpt = _saved_config(checkpoint_dir)
    config = resolve_model_config(saved.name, config_overrides, base=saved)
    state = _read_weights(weights_path, litgpt, config)
    dtype = dtype or _saved_dtype(state)
    with torch.device(device):
        model = GPT(config)
    for p in model.parameters():  # parameters only: float32 buffers (RoPE frequencies) keep their precision
        p.data = p.data.to(dtype)
    _load_weights(model, state, weights_path, config.attention != saved.attention)
    return model, _load_tokenizer(Path(checkpoint_dir), config), config


def load_config(checkpoint_dir: Path, **config_overrides: Any) -> Config:
    """The checkpoint's model config with `config_overrides` applied (as `load` builds it), without the weights."""
    saved, _, _ = _saved_config(checkpoint_dir)
    return resolve_model_config(saved.name, config_overrides, base=saved)


def load_weights(model: GPT, checkpoint_dir: Path) -> None:
    """Copy a checkpoint's weights into a model built from its config (`load_config`, perhaps with another
    attention mechanism, whose new parameters then keep their init). Shapes and keys are checked as in `load`."""
    saved, weights_path, litgpt = _saved_config(checkpoint_dir)
    state = _read_weights(weights_path, litgpt, model.config)
    _load_weights(model, state, weights_path, model.config.attention != saved.attention)


def _saved_config(checkpoint_dir: Path) -> tuple[Config, Path, bool]:
    """(the config saved in the directory, its weights file, whether it is a litgpt checkpoint)."""
    checkpoint_dir = Path(checkpoint_dir)
    _recover(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(
            f"Checkpoint directory {str(checkpoint_dir)!r} not found; pass a directory written by litattn "
            "(pretrain, finetune or convert) or a litgpt checkpoint directory"
        )
    config_path = checkpoint_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: a checkpoint directory needs its model_config.yaml beside the weights "
            "(copy it from the run that wrote the weights)"
        )
    if (checkpoint_dir / MODEL_FILE).is_file():
        weights_path, litgpt = checkpoint_dir / MODEL_FILE, False
    elif (checkpoint_dir / LITGPT_MODEL_FILE).is_file():
        weights_path, litgpt = checkpoint_dir / LITGPT_MODEL_FILE, True
    else:
        raise FileNotFoundError(
            f"No weights in {checkpoint_dir}: expected {MODEL_FILE} (or litgpt's {LITGPT_MODEL_FILE}); "
            "the save was interrupted or the directory is not a checkpoint"
        )
    values = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ValueError(f"{config_path} does not hold a YAML mapping of config keys")
    if litgpt:
        values = litgpt_config_to_litattn(values)
    return Config.from_dict(values), weights_path, litgpt


def _read_weights(path: Path, litgpt: bool, config: Config) -> dict[str, Tensor]:
    state = load_state_dict(path)
    return litgpt_state_dict_to_litattn(state, config) if litgpt else state


def _saved_dtype(state: dict[str, Tensor]) -> torch.dtype:
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    return max(set(floating), key=floating.count) if floating else torch.get_default_dtype()


def _load_weights(model: GPT, state: dict[str, Tensor], path: Path, attention_overridden: bool) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if attention_overridden:  # another mechanism: its own parameters are new (init) or not needed
        dropped = [k for k in unexpected if is_mechanism_parameter(k)]
        if dropped:
            warnings.warn(
                f"Attention overridden: ignoring {len(dropped)} parameter(s) of the saved mechanism, "
                f"e.g. {dropped[:3]}",
                stacklevel=3,
            )
        missing = [k for k in missing if not is_mechanism_parameter(k)]
        unexpected = [k for k in unexpected if not is_mechanism_parameter(k)]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match model_config.yaml: missing keys {listed(missing)}, unexpected keys "
            f"{listed(unexpected)}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{path} does not match model_config.yaml: shapes (checkpoint vs model) {listed(wrong)}")
    if model.config.tie_embeddings and "lm_head.weight" in state:
        head, wte = state["lm_head.weight"], state["transformer.wte.weight"]
        if head is not wte and not torch.equal(head, wte):
            raise ValueError(f"{path}: the config ties embeddings but lm_head.weight differs from the embedding")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def listed(keys: list[str], n: int = 8) -> str:
    return "[]" if not keys else ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def has_tokenizer(checkpoint_dir: Path) -> bool:
    """Whether the directory holds a tokenizer `Tokenizer` can load (tokenizer.json or tokenizer.model)."""
    return any((Path(checkpoint_dir) / name).is_file() for name in MODEL_FILES)


def _load_tokenizer(checkpoint_dir: Path, config: Config) -> Tokenizer | None:
    if not has_tokenizer(checkpoint_dir):
        return None

    tokenizer = Tokenizer(checkpoint_dir)
    tokenizer.check_fits(config.padded_vocab_size)
    return tokenizer


# ---------------------------------------------------------------------------------- litgpt
# litgpt's defaults where they differ from litattn's (its YAML normally lists every key anyway).
_LITGPT_DEFAULTS = dict(block_size=4096, n_layer=16, n_embd=4096, vocab_size=50254, n_head=32)
_LITGPT_DEFAULTS.update(parallel_residual=True, rotary_percentage=0.25)
_LLAMA3_ROPE_KEYS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}


def _all_layers(v: Any) -> bool:
    return v is None or v == "all" or (isinstance(v, list) and all(v))


# litgpt-only keys and when their value leaves the architecture as litattn builds it.
_LITGPT_NEUTRAL = {
    "hf_config": lambda v, c: True,
    "norm_qk": lambda v, c: not v,
    "norm_qk_type": lambda v, c: True,
    "post_attention_norm": lambda v, c: not v,
    "post_mlp_norm": lambda v, c: not v,
    "attn_bias": lambda v, c: not v or c.get("bias", True),
    "attention_scores_scalar": lambda v, c: v is None or v == c.get("head_size"),
    "attention_logit_softcapping": lambda v, c: v is None,
    "final_logit_softcapping": lambda v, c: v is None,
    "sliding_window_indices": lambda v, c: _all_layers(v),
    "sliding_window_layer_placing": lambda v, c: _all_layers(v),
    "sliding_window_layer_stride": lambda v, c: v in (None, 1),
    "rope_condense_ratio": lambda v, c: v in (None, 1),
    "rope_local_base_freq": lambda v, c: v is None,
    "rope_indices": lambda v, c: v is None,
    "rope_interleave": lambda v, c: not v,
    "n_expert": lambda v, c: not v,
    "n_expert_per_token": lambda v, c: not v,
    "moe_intermediate_size": lambda v, c: True,
    "scale_embeddings": lambda v, c: not v,
    "norm_1": lambda v, c: v in (None, True),
    "norm_2": lambda v, c: v in (None, True),
    "latent_attention": lambda v, c: v is None,
}


def litgpt_config_to_litattn(values: dict[str, Any]) -> dict[str, Any]:
    """Config values from a litgpt model_config.yaml.

    Shared keys carry over (litattn follows litgpt's names). litgpt-only keys are dropped with a
    warning listing them, unless their value changes the architecture (Gemma's softcapping, MoE,
    qk-norm, ...), which litattn cannot build: that is a ValueError, not a silently different model.
    """
    known = set(Config.__dataclass_fields__)
    out = {**_LITGPT_DEFAULTS, "positional_embedding": "rope", "tie_embeddings": False}
    out.update({k: v for k, v in values.items() if k in known and k != "attention"})
    if out.get("padded_vocab_size") is not None:  # as litgpt does: the vocab never exceeds the embedding rows
        out["vocab_size"] = min(out["vocab_size"], out["padded_vocab_size"])
    extra = sorted(set(values) - known)
    changing = [k for k in extra if k in _LITGPT_NEUTRAL and not _LITGPT_NEUTRAL[k](values[k], out)]
    unsupported = [f"{k}={values[k]!r}" for k in changing]
    if out.get("mlp_class_name", "GptNeoxMLP") not in ("GptNeoxMLP", "LLaMAMLP"):
        unsupported.append(f"mlp_class_name={out['mlp_class_name']!r}")
    if out.get("norm_class_name", "LayerNorm") not in ("LayerNorm", "RMSNorm"):
        unsupported.append(f"norm_class_name={out['norm_class_name']!r}")
    elif out.get("norm_class_name", "LayerNorm") == "LayerNorm" and not out.get("bias", True):
        unsupported.append("LayerNorm with bias=False (litgpt's LayerNorm keeps its bias; litattn's follows `bias`)")
    if set(out.get("rope_adjustments") or {}) - _LLAMA3_ROPE_KEYS:
        unsupported.append(f"rope_adjustments={out['rope_adjustments']!r} (only Llama-3 scaling is implemented)")
    if unsupported:
        raise ValueError(f"This litgpt model uses features litattn does not implement: {', '.join(unsupported)}")
    if extra:
        warnings.warn(f"Dropping litgpt-only config keys that litattn does not use: {', '.join(extra)}", stacklevel=3)
    return out


def litgpt_state_dict_to_litattn(state: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
    """Same names, except legacy litgpt's fused `attn.attn` whose rows interleave heads per group
    ([q_0..q_{p-1}, k, v] for each query group) where litattn has `attn.qkv` = [all q | all k | all v]."""
    out = {}
    for key, t in state.items():
        if re.fullmatch(r"transformer\.h\.\d+\.attn\.attn\.(weight|bias)", key):
            key = key.replace(".attn.attn.", ".attn.qkv.")
            t = qkv_from_interleaved(t, config)
        out[key] = t
    return out


def qkv_from_interleaved(t: Tensor, config: Config) -> Tensor:
    groups, per_group = config.n_query_groups, config.n_head // config.n_query_groups
    t = t.reshape(groups, per_group + 2, config.head_size, *t.shape[1:])
    q = t[:, :per_group].reshape(-1, *t.shape[3:])
    k = t[:, per_group].reshape(-1, *t.shape[3:])
    v = t[:, per_group + 1].reshape(-1, *t.shape[3:])
    return torch.cat((q, k, v))


__all__ = [
    "CheckpointWriteError",
    "MODEL_FILE",
    "CONFIG_FILE",
    "HPARAMS_FILE",
    "STATE_FILE",
    "load",
    "load_config",
    "load_weights",
    "load_state_dict",
    "save_state_dict",
    "save_checkpoint",
    "save_training_state",
    "load_training_state",
    "load_hyperparameters",
    "has_tokenizer",
    "rng_state",
    "set_rng_state",
    "latest_checkpoint",
    "step_dir_name",
    "litgpt_config_to_litattn",
    "litgpt_state_dict_to_litattn",
]


def weights_dtype(precision: str) -> torch.dtype:
    """The parameter dtype a precision computes in ("-true": the weights themselves; mixed: float32 masters)."""
    return {"64-true": torch.float64, "bf16-true": torch.bfloat16, "16-true": torch.float16}.get(
        str(precision), torch.float32
    )
