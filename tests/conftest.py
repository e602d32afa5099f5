import os
import sys


def _gpu_tests_asked_for():
    """`-m gpu` on the command line: the GPU tests (tests/test_gpu.py), which need the kernels compiled."""
    argv = sys.argv[1:]
    return '-mgpu' in argv or any(a == '-m' and argv[i + 1:i + 2] == ['gpu'] for i, a in enumerate(argv))


# Triton kernels run on CPU tensors only in Triton's interpreter, chosen when triton is first
# imported (torch imports it): set before any test module imports torch. `-m gpu` compiles them.
os.environ.setdefault('TRITON_INTERPRET', '0' if _gpu_tests_asked_for() else '1')
if os.environ.get('PYTEST_XDIST_WORKER'):
    # pytest -n 2 (pytest.ini) on 2 cores: one thread per worker process, no oversubscription
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import torch
    torch.set_num_threads(1)

import pytest  # noqa: E402

import tests.small_models  # noqa: E402,F401  registers volo_test, the training runs' small VOLO


@pytest.fixture(scope='session')
def shapes(tmp_path_factory):
    """The generated 3-class shapes dataset with token labels, built once for the whole session
    (tests that change it work on a copy)."""
    from data.synthetic import make_shapes_dataset
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_classes=3, train_per_class=8,
                               val_per_class=4, img_size=40, label_size=6)
