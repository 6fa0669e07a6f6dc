import pytest

from vggnet.synthetic import SyntheticSpec, make_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny built-in dataset: 24 training and 6 validation images of 3 classes, 36-48 px
    (3 steps an epoch at batch 8). Per module, so a module may add bad files to it."""
    root = tmp_path_factory.mktemp("shapes")
    make_synthetic(root, SyntheticSpec(seed=1, train_per_class=8, val_per_class=2, num_classes=3,
                                       min_side=36, max_side=48), workers=1)
    return root
