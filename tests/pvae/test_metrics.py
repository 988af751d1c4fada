"""Sample quality metrics: the cached digit classifier, the Fréchet distance and the label histogram."""

import copy
import math
import os
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torchvision.transforms.functional import gaussian_blur

from pvae import metrics
from pvae.data import load_images

# Small convolutions on a shared CPU: one intra-op thread beats two that wait on each other. Training
# always runs on one thread (see pvae.metrics._train), so no weight depends on this.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pvae-cache"))


@pytest.fixture(autouse=True)
def use_cache_dir(cache_dir, monkeypatch):
    """Every test finds (and the first one trains) the classifier in the session's cache folder."""
    monkeypatch.setenv("PVAE_CACHE_DIR", cache_dir)


@pytest.fixture(scope="session")
def mnist5k():
    """Both splits, parsed once: training reads them through ``metrics.load_images``, patched to these."""
    return {split: load_images("mnist5k", split) for split in ("train", "test")}


def _serve(mnist5k):
    def load(name, split):
        assert name == "mnist5k"
        return mnist5k[split]

    return load


@pytest.fixture(scope="session")
def classifier(cache_dir, mnist5k):
    """Trained once per session, into the session's cache folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PVAE_CACHE_DIR", cache_dir)
        patch.setattr(metrics, "load_images", _serve(mnist5k))
        assert not os.path.exists(metrics.classifier_cache_path())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a first training warns about nothing
            trained = metrics.digit_classifier(progress=False)
        assert os.path.exists(metrics.classifier_cache_path())
    return trained


@pytest.fixture(scope="session")
def train_digits(mnist5k):
    return mnist5k["train"].flat()  # (4000, 784), sorted by class


@pytest.fixture(scope="session")
def test_data(mnist5k):
    return mnist5k["test"]


@pytest.fixture(scope="session")
def test_digits(test_data):
    return test_data.flat()  # (1000, 784), sorted by class


def same_weights(first, second):
    one, two = first.state_dict(), second.state_dict()
    return one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)


# ------------------------------------------------------------------------------------------- the classifier


def test_classifier_is_accurate_and_reports_its_test_accuracy(classifier, test_data, test_digits):
    assert classifier.test_accuracy > 0.9
    with torch.no_grad():
        predicted = classifier(test_digits.reshape(-1, 1, 28, 28)).argmax(dim=1)
    assert (predicted == test_data.labels).double().mean().item() == pytest.approx(classifier.test_accuracy)
    assert classifier.features(test_digits[:5].reshape(-1, 1, 28, 28)).shape == (5, classifier.num_features)


def test_classifier_is_loaded_from_the_cache_without_training(classifier, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(metrics, "_train", no_training)
    rng_state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = metrics.digit_classifier()
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's random stream is left alone
    assert loaded is not classifier and same_weights(loaded, classifier)
    assert loaded.test_accuracy == classifier.test_accuracy
    assert not loaded.training


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    name = os.path.basename(metrics.classifier_cache_path())
    monkeypatch.setenv("PVAE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert metrics.classifier_cache_path() == str(tmp_path / "explicit" / name)
    assert metrics.classifier_cache_path(tmp_path / "given") == str(tmp_path / "given" / name)
    monkeypatch.delenv("PVAE_CACHE_DIR")
    assert metrics.classifier_cache_path() == str(tmp_path / "xdg" / "pvae" / name)
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert metrics.classifier_cache_path() == str(tmp_path / "home" / ".cache" / "pvae" / name)
    assert os.path.basename(metrics.classifier_cache_path(seed=1)) != name  # the seed is part of the key


def _stored(classifier):
    """What digit_classifier writes, with tensors copied so that a corruption stays local."""
    return {
        "format": metrics._CACHE_FORMAT,
        "key": metrics._cache_key(0),
        "state_dict": copy.deepcopy(classifier.state_dict()),
        "test_accuracy": classifier.test_accuracy,
    }


def _save(record):
    return lambda path: torch.save(record, path)


def _with_weight(name, value):
    def corrupt(classifier):
        record = _stored(classifier)
        record["state_dict"][name] = value(record["state_dict"][name])
        return _save(record)

    return corrupt


def _with_field(field, value):
    def corrupt(classifier):
        record = _stored(classifier)
        record[field] = value
        return _save(record)

    return corrupt


def _without_field(field):
    def corrupt(classifier):
        record = _stored(classifier)
        del record[field]
        return _save(record)

    return corrupt


def _garbage(classifier):
    return lambda path: open(path, "wb").write(bytes(range(256)) * 8)


def _truncated(classifier):
    def write(path):
        torch.save(_stored(classifier), path)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)

    return write


CALLS_FROM_PICKLES = []


def record_call():
    CALLS_FROM_PICKLES.append(True)
    return metrics._cache_key(0)  # a valid key: only a refusal to run it can reject the file


class _RunsCode:
    def __reduce__(self):
        return (record_call, ())  # a pickle that calls a function when loaded without weights_only


CORRUPTIONS = {
    "garbage-bytes": _garbage,
    "truncated": _truncated,
    "empty-file": lambda classifier: lambda path: open(path, "wb").close(),
    "wrong-shape": _with_weight("hidden.weight", lambda w: w[:, :-1].clone()),
    "nan-weight": _with_weight("conv1.weight", lambda w: w.index_fill(0, torch.tensor([0]), math.nan)),
    "inf-bias": _with_weight("logits.bias", lambda b: b.index_fill(0, torch.tensor([3]), math.inf)),
    "wrong-dtype": _with_weight("conv2.bias", lambda b: b.double()),
    "not-a-tensor": _with_weight("conv2.bias", lambda b: b.tolist()),
    "extra-weight": _with_field("state_dict", {"extra": torch.zeros(1)}),
    "missing-weights": _with_field("state_dict", {}),
    "stale-key": _with_field("key", "0" * 64),
    "tensor-key": _with_field("key", torch.zeros(3)),
    "other-format": _with_field("format", "pvae.metrics.digit_classifier/0"),
    "bad-accuracy": _with_field("test_accuracy", math.nan),
    "missing-field": _without_field("test_accuracy"),
    "not-a-dict": lambda classifier: _save([1, 2, 3]),
    "pickled-code": _with_field("key", _RunsCode()),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_cache_is_replaced_with_a_warning(corruption, classifier, tmp_path, monkeypatch):
    # Retraining is stubbed with a copy of the session's classifier: this test is about detection and
    # rewriting; test_retraining_a_damaged_cache_repeats_the_training runs the real retraining.
    calls = []

    def train(seed, progress):
        calls.append(seed)
        return copy.deepcopy(classifier)

    monkeypatch.setattr(metrics, "_train", train)
    path = metrics.classifier_cache_path(tmp_path)
    CORRUPTIONS[corruption](classifier)(path)
    with pytest.warns(UserWarning, match="unusable .*retraining"):
        replaced = metrics.digit_classifier(tmp_path)
    assert calls == [0] and same_weights(replaced, classifier)
    assert not CALLS_FROM_PICKLES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file loads cleanly, without training
        assert same_weights(metrics.digit_classifier(tmp_path), classifier)
    assert calls == [0]


def test_unwritable_cache_folder_still_gives_a_classifier(classifier, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "_train", lambda seed, progress: copy.deepcopy(classifier))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not cache"):
        trained = metrics.digit_classifier(blocker / "cache")
    assert same_weights(trained, classifier)


def test_retraining_a_damaged_cache_repeats_the_training(classifier, mnist5k, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "load_images", _serve(mnist5k))
    path = metrics.classifier_cache_path(tmp_path)
    _with_weight("hidden.weight", lambda w: w.fill_(math.nan))(classifier)(path)
    rng_state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="NaN"):
        retrained = metrics.digit_classifier(tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_state)  # training used its own seeded streams
    assert same_weights(retrained, classifier)  # deterministic given the seed
    assert retrained.test_accuracy == classifier.test_accuracy
    assert same_weights(metrics.digit_classifier(tmp_path), classifier)


# ----------------------------------------------------------------------------------- the Fréchet distance


def test_frechet_distance_matches_the_closed_form(classifier, train_digits, test_digits):
    """torchmetrics' value against the formula, with scipy's matrix square root, on the same features."""
    generated, real = train_digits[:600].double(), test_digits[:500]
    with torch.no_grad():
        features = [classifier.features(x.float().reshape(-1, 1, 28, 28)).double() for x in (generated, real)]
    means = [f.mean(dim=0).numpy() for f in features]
    covariances = [torch.cov(f.T).numpy() for f in features]
    root = scipy.linalg.sqrtm(covariances[0] @ covariances[1]).real
    expected = np.sum((means[0] - means[1]) ** 2) + np.trace(covariances[0] + covariances[1] - 2 * root)
    assert metrics.frechet_distance(generated, real, classifier) == pytest.approx(expected, rel=1e-6)


def test_real_digits_are_far_closer_than_noise(classifier, train_digits, test_digits):
    real_vs_real = metrics.frechet_distance(train_digits[::4], test_digits, classifier)  # 100 per class each
    noise = torch.rand(1000, 784, generator=torch.Generator().manual_seed(0))
    noise_vs_real = metrics.frechet_distance(noise, test_digits, classifier)
    assert 0 < real_vs_real < 0.05 * noise_vs_real


def _blur(images, sigma, generator):
    return gaussian_blur(images, [9, 9], [sigma, sigma])


def _add_noise(images, std, generator):
    return (images + std * torch.randn(images.shape, generator=generator)).clamp(0, 1)


@pytest.mark.parametrize(
    "damage, levels",
    [
        pytest.param(_blur, [0.5, 1.0, 1.5, 2.0], id="gaussian-blur-sigma"),
        pytest.param(_add_noise, [0.05, 0.1, 0.2, 0.4], id="gaussian-noise-std"),
    ],
)
def test_distance_grows_with_damage(damage, levels, classifier, test_digits):
    images, real = test_digits[::2].reshape(-1, 1, 28, 28), test_digits[1::2]  # 50 of each digit in each half
    generator = torch.Generator().manual_seed(0)
    damaged = [damage(images, level, generator) for level in levels]
    distances = [metrics.frechet_distance(generated, real, classifier) for generated in damaged]
    assert all(low < high for low, high in zip(distances, distances[1:])), distances


# ------------------------------------------------------------------------------------- the label histogram


def test_label_entropy_measures_mode_coverage(classifier, test_digits):
    real = metrics.label_histogram(test_digits, classifier)
    assert real.counts.dtype == torch.int64 and real.counts.shape == (10,)
    assert int(real.counts.sum()) == len(test_digits)
    assert real.entropy == pytest.approx(math.log(10), rel=0.02)  # the test split has 100 of each digit
    one_digit = metrics.label_histogram(test_digits[:1].repeat(200, 1), classifier)
    assert one_digit.entropy == 0.0 and sorted(one_digit.counts.tolist())[-2:] == [0, 200]
    two_digits = torch.cat([test_digits[:1].repeat(50, 1), test_digits[-1:].repeat(50, 1)])
    assert metrics.label_histogram(two_digits, classifier).entropy == pytest.approx(math.log(2))


def test_results_follow_the_input_dtype_and_device(classifier, test_digits):
    histogram = metrics.label_histogram(test_digits.double(), classifier)
    assert histogram.counts.device == test_digits.device
    assert torch.equal(histogram.counts, metrics.label_histogram(test_digits, classifier).counts)
    halves = test_digits[::2], test_digits[1::2]
    distance = metrics.frechet_distance(*halves, classifier)
    assert metrics.frechet_distance(*[h.double() for h in halves], classifier) == pytest.approx(distance)
    images = halves[0].reshape(-1, 1, 28, 28)  # the other accepted shape, and the default classifier
    assert metrics.frechet_distance(images, halves[1]) == pytest.approx(distance, rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_run_on_the_device_of_their_input(classifier, train_digits, test_digits):
    on_cpu = metrics.frechet_distance(train_digits, test_digits, classifier)
    histogram_cpu = metrics.label_histogram(test_digits, classifier)
    gpu_classifier = copy.deepcopy(classifier)
    histogram = metrics.label_histogram(test_digits.cuda(), gpu_classifier)
    assert histogram.counts.device.type == "cuda"
    assert next(gpu_classifier.parameters()).device.type == "cuda"
    assert torch.equal(histogram.counts.cpu(), histogram_cpu.counts)
    on_gpu = metrics.frechet_distance(train_digits.cuda(), test_digits.cuda(), gpu_classifier)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-3)


# ------------------------------------------------------------------------------------------- bad inputs

BAD_IMAGES = {
    "rank-3": torch.rand(4, 28, 28),
    "783-pixels": torch.rand(4, 783),
    "two-channels": torch.rand(4, 2, 28, 28),
    "one-dim": torch.rand(784),
    "above-one": torch.full((4, 784), 1.5),
    "below-zero": torch.full((4, 784), -0.1),
    "nan": torch.full((4, 784), math.nan),
    "inf": torch.full((4, 784), math.inf),
    "integers": torch.ones(4, 784, dtype=torch.int64),
    "list": [[0.5] * 784] * 4,
    "empty": torch.rand(0, 784),
}


@pytest.mark.parametrize("bad", list(BAD_IMAGES))
@pytest.mark.parametrize("argument", ["generated", "real", "samples"])
def test_bad_images_raise_naming_the_argument(argument, bad, classifier):
    good = torch.rand(4, 784)
    with pytest.raises(ValueError, match=f"^{argument} "):
        if argument == "samples":
            metrics.label_histogram(BAD_IMAGES[bad], classifier)
        else:
            pair = {"generated": good, "real": good, argument: BAD_IMAGES[bad]}
            metrics.frechet_distance(pair["generated"], pair["real"], classifier)


def test_other_bad_arguments_raise(classifier):
    one = torch.rand(1, 784)
    with pytest.raises(ValueError, match=r"^generated must hold at least 2"):
        metrics.frechet_distance(one, torch.rand(4, 784), classifier)
    with pytest.raises(ValueError, match=r"^classifier must be"):
        metrics.label_histogram(torch.rand(4, 784), classifier=torch.nn.Linear(784, 10))
    with pytest.raises(ValueError, match=r"^seed must be"):
        metrics.digit_classifier(seed=-1)
    with pytest.raises(ValueError, match="device"):
        metrics.digit_classifier(device="tpu")
