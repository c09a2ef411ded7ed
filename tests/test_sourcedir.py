"""The training script runs in SageMaker's PyTorch 2.6 containers (Python 3.12, numpy 1.x), not only here: every
module the shipped files import is in the container (`sourcedir.TRAINING_CONTAINER`/`SERVING_CONTAINER`, or the
standard library) or in the requirements file that the container installs (`requirements.txt` in the source
directory for training, the model's `code/requirements.txt` for serving)."""

import ast
import functools
import importlib.metadata
import re
import sys
import tarfile
from pathlib import Path

from training import sourcedir, train

STDLIB = frozenset(sys.stdlib_module_names) - sourcedir.REMOVED_FROM_STDLIB
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
installed_distributions = functools.cache(importlib.metadata.packages_distributions)  # import name -> its dists


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(name, ast.Name) and name.id in IMPORT_ERRORS for name in types)


def imported_modules(path: Path) -> set[str]:
    """The top-level modules `path` imports anywhere (functions included), less relative imports and imports
    that a try/except ImportError makes optional (sagemaker_inference's error class in inference.py)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    optional = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.Try) and any(_catches_import_error(handler) for handler in node.handlers)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    modules = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            modules |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.partition(".")[0])
    return modules


def requirement_names(path: Path) -> set[str]:
    """The normalized distribution names a requirements file asks for (none when there is no file)."""
    names = set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line.partition("#")[0].strip())
        if match:
            names.add(re.sub(r"[-_.]+", "-", match.group()).lower())
    return names


def unprovided(directory: Path, shipped: tuple[str, ...], container: frozenset[str]) -> dict[str, list[str]]:
    """The modules that the shipped `.py` files of `directory` import and neither Python 3.12's standard library,
    nor `container`, nor a shipped `requirements.txt` provides, each with the files importing it. A module of
    this folder that is not shipped (report.py) counts as missing too."""
    requirements = requirement_names(directory / "requirements.txt") if "requirements.txt" in shipped else set()

    def required(module: str) -> bool:
        names = {module, *installed_distributions().get(module, ())}
        return any(re.sub(r"[-_.]+", "-", name).lower() in requirements for name in names)

    siblings = {Path(name).stem for name in shipped if name.endswith(".py")}
    missing: dict[str, list[str]] = {}
    for name in sorted(name for name in shipped if name.endswith(".py")):
        for module in sorted(imported_modules(directory / name)):
            if module in siblings or module in STDLIB or module in container or required(module):
                continue
            missing.setdefault(module, []).append(name)
    return missing


def test_the_training_and_serving_code_imports_only_what_the_containers_provide_or_install():
    training = unprovided(sourcedir.HERE, sourcedir.FILES, sourcedir.TRAINING_CONTAINER)
    assert training == {}, (
        f"{training}: the training container ({sourcedir.CONTAINER_PYTHON}) lacks these; add each to "
        "training/requirements.txt (pinned as in requirements.txt), or list it in sourcedir.TRAINING_CONTAINER "
        "if the container's Dockerfile installs it"
    )
    serving = unprovided(sourcedir.HERE, train.SERVING_CODE, sourcedir.SERVING_CONTAINER)
    assert serving == {}, (
        f"{serving}: the serving container lacks these; the model's code/ must carry a requirements.txt "
        "(add it to train.SERVING_CODE) that names them, or list them in sourcedir.SERVING_CONTAINER if the "
        "container's Dockerfile installs them"
    )


def test_the_check_fails_on_an_import_that_nothing_provides(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "train.py").write_text(
        "import json, os.path\n"
        "import numpy as np\n"
        "from torch import nn\n"
        "from .helpers import thing\n"  # relative: the folder's own
        "from model import Net\n"  # a shipped sibling
        "try:\n"
        "    from sagemaker_inference.errors import BaseInferenceToolkitError\n"
        "except ImportError:\n"
        "    BaseInferenceToolkitError = Exception\n"
        "def plot():\n"
        "    import matplotlib.pyplot as plt\n"
        "    import report\n"  # in the folder, not shipped
        "    import distutils.util\n"  # standard library of 3.11, gone in 3.12
    )
    (source / "model.py").write_text("import torch\n")
    (source / "report.py").write_text("import matplotlib\n")
    shipped = ("train.py", "model.py", "requirements.txt")
    missing = {"distutils": ["train.py"], "matplotlib": ["train.py"], "report": ["train.py"]}
    assert unprovided(source, shipped, sourcedir.TRAINING_CONTAINER) == missing

    (source / "requirements.txt").write_text("# plots\nMatplotlib>=3.9  # pinned as at the root\n")
    still = {"distutils": ["train.py"], "report": ["train.py"]}
    assert unprovided(source, shipped, sourcedir.TRAINING_CONTAINER) == still
    assert unprovided(source, ("train.py", "model.py"), sourcedir.TRAINING_CONTAINER) == missing  # not shipped


def test_what_training_requirements_name_is_installed_here_too():
    """`fit --local` runs the same files in this virtualenv, which installs nothing from training/."""
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in importlib.metadata.distributions()}
    missing = requirement_names(sourcedir.HERE / "requirements.txt") - installed
    assert not missing, f"{missing}: add them, pinned the same, to the repository's requirements.txt"


def test_pack_and_copy_carry_the_requirements_file(tmp_path):
    with tarfile.open(sourcedir.pack(tmp_path / "sourcedir.tar.gz")) as archive:
        assert sorted(archive.getnames()) == sorted(sourcedir.FILES)
    assert "requirements.txt" in sourcedir.FILES
    code = sourcedir.copy(tmp_path / "code").parent
    assert (code / "requirements.txt").read_text() == (sourcedir.HERE / "requirements.txt").read_text()


# numpy names that 2.x has and 1.26 (the training container's numpy<2) lacks or means otherwise: 2.0's aliases of
# the array API, long/ulong and bool (re-added in 2.0), unstack and cumulative_* (2.1), matvec/vecmat (2.2).
NUMPY2_ONLY = frozenset({
    "long", "ulong", "bool", "isdtype", "astype", "unstack", "cumulative_sum", "cumulative_prod", "concat",
    "permute_dims", "matrix_transpose", "vecdot", "matvec", "vecmat", "pow", "acos", "acosh", "asin", "asinh", "atan",
    "atan2", "atanh", "bitwise_left_shift", "bitwise_right_shift", "bitwise_invert", "trapezoid", "unique_all",
    "unique_counts", "unique_inverse", "unique_values", "strings",
})  # fmt: skip


def numpy2_only_uses(path: Path) -> list[str]:
    """`np.<name>` for a name of NUMPY2_ONLY, and any numpy call given `copy=` (numpy 2 changed what
    `np.array(copy=False)` means and added `copy` to `np.asarray`), as `line: source`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if alias.name == "numpy"}  # fmt: skip

    def of_numpy(node) -> bool:
        return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases

    def numpy2_only(node) -> bool:
        if isinstance(node, ast.Call):
            return of_numpy(node.func) and any(keyword.arg == "copy" for keyword in node.keywords)
        return of_numpy(node) and node.attr in NUMPY2_ONLY

    uses = sorted((node.lineno, node.col_offset, ast.unparse(node)) for node in ast.walk(tree) if numpy2_only(node))
    return [f"{path.name}:{line}: {source}" for line, _, source in uses]


def test_the_shipped_code_uses_nothing_numpy_1_lacks(tmp_path):
    shipped = sorted({*sourcedir.FILES, *train.SERVING_CODE} - {"requirements.txt"})
    assert [use for name in shipped for use in numpy2_only_uses(sourcedir.HERE / name)] == []

    (tmp_path / "x.py").write_text("import numpy as np\na = np.array([1], copy=False)\nb = np.long(a[0])\n")
    assert numpy2_only_uses(tmp_path / "x.py") == ["x.py:2: np.array([1], copy=False)", "x.py:3: np.long"]
