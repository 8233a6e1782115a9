"""Remote code: the package's model code, written as flat files beside a checkpoint's weights.

With these files and an ``auto_map`` in ``config.json``, a user without ``tte_flash`` installed loads a
checkpoint with ``AutoConfig/AutoModel.from_pretrained(dir_or_hub_id, trust_remote_code=True)``.
Weights stay safetensors; nothing is pickled.

transformers' remote-code loader copies a module file plus the files of its relative imports
(``from .x import y`` -> ``x.py`` in the same folder), found by regex, one folder deep. The package
does not fit that shape as it is (``.kernels`` is a package, the save hook imports
``.integrations.remote_code``), so :func:`write_remote_code` flattens it: starting from the entry
modules it follows relative imports (lazy ones inside functions too), and writes each module
reached as one flat file with its relative imports rewritten to the flat names:

    tte_flash.configuration  -> configuration_tte_flash.py     (auto_map: AutoConfig)
    tte_flash.modeling       -> modeling_tte_flash.py          (auto_map: AutoModel)
    tte_flash.<a>.<b>        -> tte_flash_<a>_<b>.py           (attention, mask, processing, ...)
    tte_flash.kernels        -> tte_flash_kernels.py           (a shim, see below)

Three rewrites besides the imports, each checked (a missing pattern raises at save time, so a
refactor cannot silently ship broken remote code):

* ``tte_flash.kernels`` (Triton) is replaced by a shim: the installed package's kernel when
  ``tte_flash`` is importable, else the reference attention (same contract, SDPA over blocks of rows, any device).
  Remote code therefore never needs triton, and never fails on CUDA;
* the attention-registry name ``ATTN_NAME = "tte"`` becomes a name unique to each loaded copy, so the
  package and any number of remote copies can live in one process without one's attention function
  receiving another's layout class (a digest of the module name: the same name in every process, so
  a model pickled into worker processes, as sentence-transformers' multi-process pool does, loads);
* top-level ``Auto*.register(...)`` calls are dropped: the remote-code loader registers the classes
  itself, and the installed package's registrations are left alone; a
  ``register_checkpoint_conversion_mapping(name, ...)`` call is skipped when ``name`` already has one.

Only the code the model needs to load and run is written: the save-time modules (``SAVE_ONLY``: the
model card, this writer, the save hook) are replaced by a second shim, ``tte_flash_save_hooks.py``,
whose functions write nothing (a remote copy re-saves its code through transformers, without a card).
Re-saving into a directory removes generated files the current code no longer needs.

When this module runs as remote code itself (a remote model's ``save_pretrained``), it does nothing:
transformers re-saves remote classes and their files through ``custom_object_save``.
"""
from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

PACKAGE = "tte_flash"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# auto_map entries: auto class -> (module, class name).
AUTO_MAP = {"AutoConfig": ("tte_flash.configuration", "TTEFlashConfig"),
            "AutoModel": ("tte_flash.modeling", "TTEFlashModel")}
# Modules flattened besides the auto_map ones (a sentence-transformers module class for modules.json).
EXTRA_ENTRIES = ("tte_flash.integrations.sentence_transformers",)
FLAT_NAMES = {"tte_flash.configuration": "configuration_tte_flash", "tte_flash.modeling": "modeling_tte_flash"}
KERNELS = "tte_flash.kernels"
KERNELS_SHIM = "tte_flash_kernels"
KERNELS_SHIM_EXPORTS = {"tte_attention", "prepare_layout", "tte_attention_with_layout", "unsupported_gpu"}
KERNELS_SHIM_SOURCE = '''"""Attention kernel for TTE-Flash remote code.

The fused Triton kernel of the installed ``tte_flash`` package when there is one; otherwise the
reference attention (PyTorch SDPA over blocks of query rows, each with its rows of the mask built from the
same rule; same contract, any device, no L x L mask). Install ``tte-flash`` for the fused kernel.
"""
try:
    from tte_flash.kernels import prepare_layout, tte_attention, tte_attention_with_layout, unsupported_gpu
except ImportError:
    from collections import namedtuple

    from .tte_flash_attention import reference_attention as tte_attention

    _Layout = namedtuple("_Layout", "seq_ids token_types think_bidirectional cot_sees_query")

    def prepare_layout(seq_ids, token_types, *, think_bidirectional=False, cot_sees_query=True):
        return _Layout(seq_ids, token_types, think_bidirectional, cot_sees_query)

    def tte_attention_with_layout(q, k, v, layout, *, scale=None):
        return tte_attention(q, k, v, layout.seq_ids, layout.token_types, scale=scale,
                             think_bidirectional=layout.think_bidirectional, cot_sees_query=layout.cot_sees_query)

    def unsupported_gpu(device):
        return None  # the reference attention above runs on every GPU
'''
# Save-time modules: not carried by a checkpoint; their imports in remote code go to this shim.
SAVE_ONLY = ("tte_flash.card", "tte_flash.integrations", "tte_flash.integrations.remote_code")
SAVE_HOOKS_SHIM = "tte_flash_save_hooks"
SAVE_HOOKS_EXPORTS = {"RESULT_FILES", "write_integration_files", "write_model_card", "write_remote_code"}
SAVE_HOOKS_SOURCE = '''"""Save-time hooks of TTE-Flash remote code: they write nothing.

A checkpoint carries only the code its model needs to load and run. Writing the remote code, the
sentence-transformers files' module code and the model card is the installed ``tte_flash`` package's
job; a model loaded from remote code re-saves its code through transformers (``custom_object_save``)
and writes no model card.
"""
RESULT_FILES = {}


def write_integration_files(save_directory, config=None):
    return []


def write_remote_code(save_directory, config=None):
    return []


def write_model_card(directory, config, **kwargs):
    return None
'''
GENERATED_HEADER = "# Generated from tte_flash"
ATTN_NAME_LINE = re.compile(r'^ATTN_NAME = "tte"$', re.MULTILINE)
# Unique per loaded module copy, the same in every process (a digest, not the salted built-in hash(), so a
# model pickled into a worker process finds its attention); no "/", ":" or "flash" (transformers reads those).
UNIQUE_ATTN_NAME = 'ATTN_NAME = "tte_remote_" + __import__("hashlib").sha1(__name__.encode()).hexdigest()[:16]'


def flat_name(module: str) -> str:
    """The flat file stem of a package module: ``tte_flash.mask`` -> ``tte_flash_mask``."""
    if module == KERNELS or module.startswith(KERNELS + "."):
        return KERNELS_SHIM
    if module in SAVE_ONLY:
        return SAVE_HOOKS_SHIM
    return FLAT_NAMES.get(module) or module.replace(".", "_")


def remote_code_files() -> dict[str, str]:
    """``{file name: source}`` of the flattened remote code (everything :func:`write_remote_code` writes)."""
    files = {f"{KERNELS_SHIM}.py": KERNELS_SHIM_SOURCE, f"{SAVE_HOOKS_SHIM}.py": SAVE_HOOKS_SOURCE}
    shims = {KERNELS_SHIM, SAVE_HOOKS_SHIM}
    todo = [module for module, _ in AUTO_MAP.values()] + list(EXTRA_ENTRIES)
    done = set()
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        source, imported = _flatten(module)
        files[f"{flat_name(module)}.py"] = source
        todo += [m for m in imported if flat_name(m) not in shims]
    return files


def write_remote_code(save_directory: str | os.PathLike, config=None) -> list[str]:
    """Write the remote-code files into ``save_directory`` and add ``auto_map`` to its ``config.json``.

    Called by ``TTEFlashModel.save_pretrained`` after the weights and config are written. ``config``
    is the model's config (its ``auto_map`` attribute is left unchanged). Returns the file names written.
    """
    if __name__ != f"{PACKAGE}.integrations.remote_code":  # running as remote code: transformers re-saves
        return []
    save_directory = Path(save_directory)
    config_path = save_directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: call write_remote_code after save_pretrained")
    config_dict = json.loads(config_path.read_text())
    if config_dict.get("model_type") != "tte_flash":
        raise ValueError(f"{config_path} is not a TTE-Flash config (model_type={config_dict.get('model_type')!r})")
    files = remote_code_files()
    for stale in save_directory.glob("*.py"):  # generated by an earlier save, no longer needed
        if stale.name not in files and _is_generated(stale):
            stale.unlink()
    written = []
    for name, source in files.items():
        (save_directory / name).write_text(source, encoding="utf-8")
        written.append(name)
    config_dict["auto_map"] = {auto: f"{flat_name(module)}.{cls}" for auto, (module, cls) in AUTO_MAP.items()}
    config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


# ---------------------------------------------------------------------------------------- flattening

def _module_path(module: str) -> Path:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(f"{module} is not a {PACKAGE} module")
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"remote code: no source file for {module} under {PACKAGE_DIR}")


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a relative import in ``module`` names."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(parts):
        raise ValueError(f"relative import beyond the package in {module}")
    parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _flatten(module: str) -> tuple[str, list[str]]:
    """The flat source of ``module`` and the package modules it imports."""
    path = _module_path(module)
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    is_package = path.name == "__init__.py"
    edits, imported = [], []  # edits: (start, end, text) in character offsets
    position = _char_offset(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            if not _inside_try(tree, node):
                raise ValueError(f"{path}:{node.lineno}: remote code cannot import the installed package "
                                 f"({node.module}); use a relative import")
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{path}:{node.lineno}: remote code cannot `import {PACKAGE}`; use a relative import")
        if not (isinstance(node, ast.ImportFrom) and node.level > 0):
            continue
        start, end = position(node.lineno, node.col_offset), position(node.end_lineno, node.end_col_offset)
        target = _resolve(module, is_package, node.level, node.module)
        if node.module is None:  # from . import a, b
            if any(f"{target}.{a.name}" in SAVE_ONLY for a in node.names):
                raise ValueError(f"{path}:{node.lineno}: remote code cannot import a save-time module "
                                 f"({SAVE_ONLY}) as a module; import its functions")
            names = [f"{flat_name(f'{target}.{a.name}')} as {a.asname or a.name}" for a in node.names]
            imported += [f"{target}.{a.name}" for a in node.names]
            edits.append((start, end, f"from . import {', '.join(names)}"))
            continue
        for shim, exports, source_name in ((KERNELS_SHIM, KERNELS_SHIM_EXPORTS, "KERNELS_SHIM_SOURCE"),
                                           (SAVE_HOOKS_SHIM, SAVE_HOOKS_EXPORTS, "SAVE_HOOKS_SOURCE")):
            missing = {a.name for a in node.names} - exports if flat_name(target) == shim else set()
            if missing:
                raise ValueError(f"{path}:{node.lineno}: remote-code shim {shim} has no {sorted(missing)}; "
                                 f"extend {source_name} in {__file__}")
        imported.append(target)
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        edits.append((start, end, f"from .{flat_name(target)} import {names}"))
    for node in ast.walk(tree):  # a mapping the package (or another copy) registered first is kept
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_checkpoint_conversion_mapping":
            call = ast.get_source_segment(source, node)
            key = ast.get_source_segment(source, node.args[0])
            start, end = position(node.lineno, node.col_offset), position(node.end_lineno, node.end_col_offset)
            edits.append((start, end, f"(get_checkpoint_conversion_mapping({key}) or {call})"))
    for node in tree.body:  # top-level AutoX.register(...) calls
        if _is_auto_register(node):
            start, end = position(node.lineno, node.col_offset), position(node.end_lineno, node.end_col_offset)
            edits.append((start, end, "pass  # remote code: transformers' loader registers the auto classes"))
    for start, end, text in sorted(edits, reverse=True):
        source = source[:start] + text + source[end:]
    if module == f"{PACKAGE}.attention":
        source, count = ATTN_NAME_LINE.subn(UNIQUE_ATTN_NAME, source)
        if count != 1:
            raise ValueError(f"remote code: expected one line `ATTN_NAME = \"tte\"` in {path}, found {count}")
    header = (f"# Generated from {module} by tte_flash.integrations.remote_code for trust_remote_code loading.\n"
              f"# Do not edit: re-save the model with the tte-flash package instead.\n")
    return header + source, imported


def _char_offset(source: str):
    """(line, UTF-8 byte column) as ast reports them -> character offset into ``source``."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def position(lineno: int, col: int) -> int:
        return starts[lineno - 1] + len(lines[lineno - 1].encode("utf-8")[:col].decode("utf-8"))
    return position


def _is_generated(path: Path) -> bool:
    """Whether ``path`` is a file this writer generated (its header), or one of its shims."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(len(GENERATED_HEADER))
    return head == GENERATED_HEADER or path.read_text(encoding="utf-8", errors="replace") in (
        KERNELS_SHIM_SOURCE, SAVE_HOOKS_SOURCE)


def _inside_try(tree: ast.AST, target: ast.AST) -> bool:
    return any(isinstance(node, ast.Try) and any(child is target for child in ast.walk(node))
               for node in ast.walk(tree))


def _is_auto_register(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    func = node.value.func
    return (isinstance(func, ast.Attribute) and func.attr == "register" and isinstance(func.value, ast.Name)
            and func.value.id.startswith("Auto"))
