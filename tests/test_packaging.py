"""The repository's top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` package.

transformers 5.25+ imports ``kernels`` (Hugging Face's package). Python started in the repository root
has the root on ``sys.path`` first, where ``kernels/`` is this project's Triton folder, installed as
``tte_flash.kernels``. Every check runs a fresh interpreter from the root, as a user's command does.
"""
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd=ROOT, env_extra=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_import_kernels_from_the_root_is_hugging_face_or_nothing():
    done = _run(["-c", textwrap.dedent("""
        import importlib.util, sys
        if importlib.util.find_spec('kernels') is None:
            print('NONE')
        else:
            import kernels
            print('FILE', getattr(kernels, '__file__', None))
            try:
                import kernels.tte_attention
                print('OURS-REACHABLE')
            except ModuleNotFoundError:
                pass
        """)])
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    assert out.startswith("FILE ") and "OURS-REACHABLE" not in out, out
    file = out.split(" ", 1)[1]
    try:  # Hugging Face's package where it is installed, else the empty stand-in (no file: test below)
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert file == "None", out
    else:
        assert file != "None" and not Path(file).resolve().is_relative_to(ROOT / "kernels"), out


def _fake_path_program(extra_dirs):
    """A program that imports ``kernels`` from the root with only the root, ``extra_dirs`` and the standard
    library on sys.path (no site-packages: Hugging Face's package, installed or not, is out of the way)."""
    return textwrap.dedent(f"""
        import sys, sysconfig
        stdlib = sysconfig.get_paths()['stdlib']
        sys.path[:] = ['', *{[str(d) for d in extra_dirs]!r}, stdlib, stdlib + '/lib-dynload']
        try:
            import kernels
        except ModuleNotFoundError as e:
            print('MISSING', e.name, '|', e)
        else:
            print('FILE', getattr(kernels, '__file__', None), getattr(kernels, 'MARK', None))
        """)


def test_without_hugging_face_kernels_the_name_reads_as_not_installed():
    """Without Hugging Face's package, ``import kernels`` from the root gives an empty stand-in that the probe of
    transformers 5.17 (``transformers.utils.import_utils._is_package_available``, restated below: ``find_spec``
    finds the folder, no distribution metadata, so it imports the name and reads ``__version__``; no version and no
    ``__file__`` is a namespace package shadowing nothing) takes for "not installed"; this folder's modules stay
    unreachable under that name, and using the stand-in raises errors that say what is missing. (Raising
    ``ModuleNotFoundError`` on import, as before, made that probe, hence ``import transformers``, crash.)"""
    program = _fake_path_program([]).replace("import kernels\n", "import kernels, importlib, importlib.metadata, "
                                             "importlib.util\n") + textwrap.dedent("""
        assert importlib.util.find_spec('kernels') is not None  # the root's folder is found under the name
        try:
            importlib.metadata.version('kernels')
        except importlib.metadata.PackageNotFoundError:
            package = importlib.import_module('kernels')
            version = getattr(package, '__version__', 'N/A')
            print('PROBE', 'installed' if version != 'N/A' or getattr(package, '__file__', None) else 'absent')
        try:
            kernels.get_kernel
        except AttributeError as e:
            print('ATTR', e)
        try:
            from kernels import get_kernel
        except ImportError:
            print('FROM-IMPORT ImportError')
        try:
            import kernels.tte_attention
        except ModuleNotFoundError:
            print('SUBMODULE ModuleNotFoundError')
        """)
    done = _run(["-c", program])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "FILE None None" and "PROBE absent" in lines, done.stdout
    assert "FROM-IMPORT ImportError" in lines and "SUBMODULE ModuleNotFoundError" in lines, done.stdout
    attr = next(line for line in lines if line.startswith("ATTR"))
    assert "'get_kernel'" in attr and "not installed" in attr and "tte_flash.kernels" in attr


def test_a_kernels_package_later_on_the_path_is_the_one_imported(tmp_path):
    fake = tmp_path / "site" / "kernels"
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'hf'\nfrom .sub import thing\n")
    (fake / "sub" / "__init__.py").write_text("thing = 1\n")
    done = _run(["-c", _fake_path_program([tmp_path / "site"])])
    assert done.returncode == 0, done.stderr
    file, mark = done.stdout.split()[1:3]
    assert Path(file).resolve() == (fake / "__init__.py").resolve() and mark == "hf", done.stdout


def test_transformers_imports_from_the_root():
    done = _run(["-c", "import transformers.integrations.hub_kernels, tte_flash, tte_flash.kernels as k; "
                       "print(k.tte_attention.__module__)"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "tte_flash.kernels.tte_attention"


@pytest.mark.parametrize("module", ["tte_flash.evaluate", "tte_flash.synthetic", "tte_flash.mmeb",
                                    "tte_flash.mmeb_prepare", "tte_flash.distributed"])
def test_documented_module_commands_run_from_the_root(module):
    done = _run(["-m", module, "--help"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage" in done.stdout


def test_pytest_collects_from_the_root():
    done = _run(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_mask.py"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower()


# ------------------------------------------------------------------------------ declared dependencies

# import name -> distribution name, where they differ
IMPORT_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "liger_kernel": "liger-kernel",
                  "sentence_transformers": "sentence-transformers", "huggingface_hub": "huggingface-hub",
                  "flash_attn": "flash-attn"}
# modules that are themselves optional: their top-level imports may come from their extra
OPTIONAL_MODULES = {"tte_flash/training.py": "train", "tte_flash/integrations/mteb.py": "mteb"}


def _setup_kwargs():
    """install_requires and extras_require as setup.py computes them (setup() replaced by a recorder)."""
    import types
    from unittest import mock
    recorded = {}
    stub = types.ModuleType("setuptools")
    stub.setup = lambda **kwargs: recorded.update(kwargs)
    source = (ROOT / "setup.py").read_text(encoding="utf-8")
    cwd = os.getcwd()
    with mock.patch.dict(sys.modules, {"setuptools": stub}):
        try:
            os.chdir(ROOT)  # setup.py reads README.md relative to the root
            exec(compile(source, str(ROOT / "setup.py"), "exec"), {"__name__": "__main__"})
        finally:
            os.chdir(cwd)
    return recorded["install_requires"], recorded["extras_require"]


def _dist(requirement: str) -> str:
    import re
    name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports():
    """{(file, import name, lazy)} for every third-party import in tte_flash/ and kernels/; lazy: inside a
    function, a try or an if (an optional import), else at module level."""
    import ast
    found = set()
    for path in sorted([*(ROOT / "tte_flash").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = {id(node) for block in ast.walk(tree)
                   if isinstance(block, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try, ast.If))
                   for node in ast.walk(block) if node is not block}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("tte_flash", "__future__"):
                    continue
                found.add((path.relative_to(ROOT).as_posix(), top, id(node) in guarded))
    return found


def test_every_import_is_declared_and_every_requirement_imported():
    """What tte_flash/ and kernels/ import is declared where it is needed (setup.py): module-level imports of
    the core in install_requires, those of an optional module (training, the mteb integration) in its extra,
    lazy ones (inside a function, try or if) in install_requires or some extra; and install_requires holds
    nothing that is never imported."""
    install_requires, extras = _setup_kwargs()
    core = {_dist(r) for r in install_requires}
    extra_dists = {name: {_dist(r) for r in requirements} for name, requirements in extras.items()}
    anywhere = core.union(*extra_dists.values())
    imports = _third_party_imports()
    assert imports, "no imports found: the scan is broken"
    undeclared = []
    for file, top, lazy in sorted(imports):
        dist = _dist(IMPORT_TO_DIST.get(top, top))
        if lazy:
            ok = dist in anywhere
        elif file in OPTIONAL_MODULES:
            ok = dist in core or dist in extra_dists[OPTIONAL_MODULES[file]]
        else:
            ok = dist in core
        if not ok:
            undeclared.append(f"{file}: {top} ({'lazy: in an extra' if lazy else 'module level'}) -> {dist}")
    assert not undeclared, "imported but not declared in setup.py:\n" + "\n".join(undeclared)
    imported = {_dist(IMPORT_TO_DIST.get(top, top)) for _, top, _ in imports}
    assert not core - imported, f"install_requires never imported by tte_flash/ or kernels/: {sorted(core - imported)}"
    for name in ("train", "parquet", "dev"):  # Parquet files: pyarrow (tte_flash.data); datasets (tests compare to it)
        assert {"pyarrow", "datasets"} <= extra_dists[name], name
    st = [r for r in extras["sentence-transformers"] if _dist(r) == "sentence-transformers"]
    assert st and all(">=5" in r.replace(" ", "") for r in st), st  # encode_query/encode_document: ST 5
