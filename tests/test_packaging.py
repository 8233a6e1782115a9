"""The repository's top-level ``kernels/`` folder never shadows Hugging Face's ``kernels`` package.

transformers 5.25+ imports ``kernels`` (Hugging Face's package). Python started in the repository root
has the root on ``sys.path`` first, where ``kernels/`` is this project's Triton folder, installed as
``tte_flash.kernels``. Every check runs a fresh interpreter from the root, as a user's command does.
"""
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
            try:
                import kernels
            except ModuleNotFoundError as e:
                print('MISSING', e)
            else:
                print('FILE', kernels.__file__)
                try:
                    import kernels.tte_attention
                    print('OURS-REACHABLE')
                except ModuleNotFoundError:
                    pass
        """)])
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    assert "OURS-REACHABLE" not in out
    if out.startswith("FILE"):
        assert not Path(out.split(" ", 1)[1]).resolve().is_relative_to(ROOT / "kernels"), out
    else:
        assert out.startswith("MISSING") and "tte_flash.kernels" in out, out


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
            print('FILE', kernels.__file__, getattr(kernels, 'MARK', None))
        """)


def test_without_hugging_face_kernels_the_import_fails_cleanly():
    done = _run(["-c", _fake_path_program([])])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("MISSING kernels |"), done.stdout
    assert "tte_flash.kernels" in done.stdout
    left = _run(["-c", _fake_path_program([]) + "\nprint('LEFT', 'kernels' in sys.modules)"])
    assert left.stdout.split()[-2:] == ["LEFT", "False"], left.stdout  # no half-imported module stays behind


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


@pytest.mark.parametrize("module", ["tte_flash.evaluate", "tte_flash.synthetic", "tte_flash.mmeb"])
def test_documented_module_commands_run_from_the_root(module):
    done = _run(["-m", module, "--help"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage" in done.stdout


def test_pytest_collects_from_the_root():
    done = _run(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_mask.py"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower()
