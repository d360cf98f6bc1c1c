import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N` (make test): the workers share the cores, one each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import dreambooth_photos
import user_errors
from ether_diffusion.builtin import resolve_model_path


def pytest_configure(config):
    config.addinivalue_line("markers", "user_error(mistake, tool=...): a user mistake this test shows is handled "
                                       "(listed in docs/user_errors.md, see tests/user_errors.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    user_errors.collect(item, outcome.get_result())


# The files that take longest, longest first: `make test` (pytest -n 2 --dist loadfile) hands files to its workers
# in collection order, so these start first and overlap, instead of one of them ending the run alone.
SLOWEST_FIRST = ("test_toy_model.py", "test_reproduce.py", "test_eval_dreambooth.py", "test_export.py",
                 "test_text_encoder.py", "test_train_dreambooth.py", "test_adapter_batch.py", "test_runs.py",
                 "test_methods.py", "test_analysis.py")


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: each file keeps its order


def pytest_runtest_logreport(report):
    user_errors.rows_of(report)
    dreambooth_photos.note(report)


def pytest_terminal_summary(terminalreporter):
    for line in dreambooth_photos.summary_lines():  # never a silent skip: say what ran on the small copy
        terminalreporter.write_line(line, yellow=True)


@pytest.fixture
def whole_dreambooth(request):
    """The whole DreamBooth dataset, or the copy in tests/data/dreambooth (and the run's summary says so)."""
    return dreambooth_photos.whole_dataset(request.node)


def pytest_sessionfinish(session):
    # the main process writes it (`pytest -n` workers hand it their rows through the reports)
    if os.environ.get("USER_ERRORS_TABLE") and not hasattr(session.config, "workerinput"):
        user_errors.write_table(os.environ["USER_ERRORS_TABLE"])


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the tiny models are much faster so, and on a busy 2-core machine two
    threads can be 50x slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(folder)` makes `folder` read-only (mode 0555, made if missing; writable again after the test).
    Root writes there anyway, so under root `os.access`, which the commands ask before they work, also reports
    it as a user would find it: read-only."""
    folders = []

    def make(folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder.resolve())
        return folder

    if os.geteuid() == 0:
        access = os.access

        def access_as_a_user(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).resolve() in folders:
                return False
            return access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access_as_a_user)
    yield make
    for folder in folders:
        folder.chmod(0o755)


@pytest.fixture(scope="session")
def tiny_sd_path():
    return resolve_model_path("builtin:tiny-sd")


@pytest.fixture(scope="session")
def _tiny_unet(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").eval()


@pytest.fixture
def tiny_unet(_tiny_unet):
    """A fresh copy of the tiny SD UNet (float32, eval mode) for each test."""
    return copy.deepcopy(_tiny_unet)


@pytest.fixture
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 7, 32, generator=g),
    )
