"""The image pipeline: datasets, tokenizers, class-conditional model, guidance, FID."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from move.config import model_config_from_preset
from move.errors import ConfigError, DataError
from move.evaluation.fid import InceptionFeatures, fid_from_features, frechet_distance
from move.image.datasets import load_folder
from move.image.prepare import load_prepared_images
from move.image.sampling import class_grid_labels, guided_logits, sample_image_tokens, save_grid
from move.image.tasks import GenerationTask, ReconstructionTask, conditional_sequences, image_nll_bits
from move.image.tokenizers import PixelQuantizer, as_float
from move.model.gpt import GPT
from move.model.vqvae import VQVAE, VQConfig
from move.training.optim import OptimConfig
from move.training.trainer import TrainConfig, Trainer


def image_gpt(data, variant="move", seed=0, **overrides):
    torch.manual_seed(seed)
    config = model_config_from_preset(
        "tiny", vocab_size=data.layout.vocab_size, seq_len=data.tokens_per_image, value_memory=variant, **overrides
    )
    return GPT(config)


# ---------------------------------------------------------------------------- datasets and tokenizers
def test_digits_split_is_disjoint_and_fixed(digits):
    assert digits.shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    assert set(np.unique(digits.train_images)) <= {round(v * 255 / 16) for v in range(17)}


def test_pixel_quantizer_round_trip(digits):
    q = PixelQuantizer(17, digits.shape)
    tokens = q.encode(digits.test_images)
    assert tokens.shape == (len(digits.test_images), 8, 8) and int(tokens.max()) < 17
    assert torch.equal(q.decode(tokens), torch.from_numpy(digits.test_images))  # digits have exactly 17 levels
    noise = np.random.default_rng(0).integers(0, 256, size=(50, 1, 8, 8), dtype=np.uint8)
    error = (q.decode(q.encode(noise)).int() - torch.from_numpy(noise).int()).abs().max()
    assert error <= 255 / 16 / 2 + 0.5  # half a quantisation step, plus rounding


def test_pixel_quantizer_refuses_colour():
    with pytest.raises(ConfigError):
        PixelQuantizer(17, (3, 8, 8))


def test_vq_quantize_picks_nearest_normalised_code():
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(image_size=8, channels=1, hidden=8, downsample=1, codebook_size=32, code_dim=4))
    z = torch.randn(3, 4, 4, 4)
    zn, zq, ids = vq.quantize(z)
    codes = torch.nn.functional.normalize(vq.codebook.weight, dim=-1)
    flat = zn.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(ids.flatten(), torch.cdist(flat, codes).argmin(-1))
    assert torch.allclose(zq.permute(0, 2, 3, 1).reshape(-1, 4), codes[ids.flatten()])
    assert vq.encode(torch.rand(5, 1, 8, 8)).shape == (5, 4, 4)
    assert vq.decode(ids).shape == (3, 1, 8, 8)


def test_vqvae_trains_through_the_shared_loop(tmp_path, digits):
    torch.manual_seed(0)
    vq = VQVAE(VQConfig(image_size=8, channels=1, hidden=32, downsample=1, codebook_size=64, code_dim=4))
    task = ReconstructionTask(digits, batch_size=64, seed=0, eval_images=359)
    config = TrainConfig(steps=300, eval_every=300, checkpoint_every=300, optim=OptimConfig(lr_adamw_matrix=3e-3))
    summary = Trainer(vq, task, config, tmp_path / "vq", quiet=True).run()
    test = as_float(digits.test_images)
    mean_image_mse = ((test - as_float(digits.train_images).mean(0)) ** 2).mean().item()
    assert summary["recon_mse"] < 0.5 * mean_image_mse  # far better than predicting the mean image
    assert 0 < summary["codebook_usage"] <= 1 and summary["code_perplexity"] > 4


# ---------------------------------------------------------------------------- class-conditional model
def test_sequences_put_the_class_first(digits_tokens):
    data = load_prepared_images(digits_tokens)
    x, y = conditional_sequences(data.tokens("train")[:3], data.labels("train")[:3], data.layout)
    assert x.shape == y.shape == (3, 64)
    assert torch.equal(x[:, 0], torch.from_numpy(data.labels("train")[:3]) + 17)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_label_dropout_rate_and_resume(digits_tokens):
    data = load_prepared_images(digits_tokens)
    task = GenerationTask(data, batch_size=200, seed=3, eval_images=100, label_dropout=0.1)
    first = [task.loader.next_batch()[0][:, 0] for _ in range(5)]
    null_rate = np.mean([(b == data.layout.null_token).float().mean().item() for b in first])
    assert 0.05 < null_rate < 0.15
    again = GenerationTask(data, batch_size=200, seed=3, eval_images=100, label_dropout=0.1)
    again.loader.next_batch()
    again.loader.load_state_dict(task.loader.state_dict())
    task_next, again_next = task.loader.next_batch(), again.loader.next_batch()
    assert torch.equal(task_next[0], again_next[0])


def test_digits_pipeline_lowers_nll(tmp_path, digits_tokens):
    data = load_prepared_images(digits_tokens)
    model = image_gpt(data, "move")
    task = GenerationTask(data, batch_size=32, seed=0, eval_images=359)
    before = image_nll_bits(model, data, "test", 359)
    assert before == pytest.approx(np.log2(17), abs=0.3)  # near uniform over 17 levels at init
    summary = Trainer(
        model, task, TrainConfig(steps=40, eval_every=40, checkpoint_every=40), tmp_path / "run", quiet=True
    ).run()
    assert summary["val_nll_bits"] < before - 1.0


@pytest.fixture(scope="module")
def trained_digits_model(tmp_path_factory, digits_tokens):
    data = load_prepared_images(digits_tokens)
    model = image_gpt(data, "move")
    task = GenerationTask(data, batch_size=32, seed=0, eval_images=100)
    Trainer(
        model,
        task,
        TrainConfig(steps=30, eval_every=30, checkpoint_every=30),
        tmp_path_factory.mktemp("run") / "r",
        quiet=True,
    ).run()
    return model.eval(), data


def test_cfg_scale_one_is_plain_conditional_and_zero_is_unconditional(trained_digits_model):
    model, data = trained_digits_model
    labels = torch.tensor([0, 3, 7, 9])
    null = torch.full_like(labels, data.layout.num_classes)
    kw = dict(layout=data.layout, n_tokens=64, temperature=1.0, seed=5)
    assert torch.equal(
        sample_image_tokens(model, labels, cfg_scale=1.0, **kw),
        sample_image_tokens(model, labels, cfg_scale=None, **kw),
    )
    assert torch.equal(
        sample_image_tokens(model, labels, cfg_scale=0.0, **kw), sample_image_tokens(model, null, cfg_scale=None, **kw)
    )
    assert not torch.equal(
        sample_image_tokens(model, labels, cfg_scale=3.0, **kw),
        sample_image_tokens(model, labels, cfg_scale=None, **kw),
    )


def test_guided_logits_formula():
    c, u = torch.randn(4, 9), torch.randn(4, 9)
    assert torch.allclose(guided_logits(c, u, 2.5), u + 2.5 * (c - u), atol=1e-6)


def test_doubled_batch_cache_matches_separate_full_passes(trained_digits_model):
    model, data = trained_digits_model
    tokens = torch.from_numpy(data.tokens("test")[:2].astype(np.int64))
    labels = torch.from_numpy(data.labels("test")[:2])
    cond, _ = conditional_sequences(tokens, labels, data.layout)
    uncond = cond.clone()
    uncond[:, 0] = data.layout.null_token
    both = torch.cat([cond, uncond])
    cache = model.new_cache(4, 64)
    with torch.no_grad():
        stepwise = torch.cat([model(both[:, t : t + 1], cache=cache) for t in range(64)], dim=1)
        assert torch.allclose(stepwise[:2], model(cond), atol=1e-4)
        assert torch.allclose(stepwise[2:], model(uncond), atol=1e-4)


@pytest.mark.parametrize("variant", ["standard", "lave", "move"])
def test_class_position_reads_the_class_row(digits_tokens, variant):
    """Documented behaviour: class tokens are vocabulary entries, so at position 0
    value memory reads the class's own row (MoVE: bank row K+c; LaVE: each table's
    row K+c; the null class has its own row); standard has no value memory."""
    data = load_prepared_images(digits_tokens)
    model = image_gpt(data, variant).eval()
    tables = [t.weight for t in model.value_tables()]
    if variant == "standard":
        assert tables == []
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name or not p.any():  # open the gates (identity at init) and the
                p.normal_(0, 0.5)  # zero-initialised output projections
    K, c = data.layout.codebook_size, 4
    x, _ = conditional_sequences(data.tokens("test")[:3], np.array([c, 7, 10]), data.layout)  # class 4, 7, null
    with torch.no_grad():
        before = model(x)[:, 0]
        for table in tables:
            table[K + c] += 1.0  # the class-4 row
            table[:K] += 1.0  # every image-code row: must not matter at position 0
        after = model(x)[:, 0]
    assert not torch.allclose(before[0], after[0])
    assert torch.allclose(before[1:], after[1:], atol=1e-6)


# ---------------------------------------------------------------------------- metrics and grids
def test_frechet_distance_matches_scipy_and_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + np.eye(6), b @ b.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    d1, d2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])  # diagonal: sum (sqrt(a) - sqrt(b))^2
    assert frechet_distance(np.zeros(2), np.diag(d1), np.ones(2), np.diag(d2)) == pytest.approx(2 + 4 + 1)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(digits):
    inception = InceptionFeatures()
    images = digits.test_images[:24]
    features = inception(images)
    assert abs(fid_from_features(features, features)) < 1e-3  # rounding of 2048-d eigendecompositions
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (20, 80):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        fids.append(fid_from_features(features, inception(noisy)))
    assert 0 < fids[0] < fids[1]


def test_grid_has_one_row_per_class_labelled_and_enlarged(tmp_path):
    images = torch.randint(0, 256, (3 * 4, 1, 8, 8), dtype=torch.uint8)
    save_grid(images, 4, tmp_path / "g.png", scale=1, pad=1)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (4 * 9 + 1, 3 * 9 + 1)
    assert class_grid_labels(3, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    save_grid(images, 4, tmp_path / "big.png", row_labels=["zero", "one", "two"])
    with Image.open(tmp_path / "big.png") as im:
        scale = 12  # 8-pixel images become cells of 96 pixels
        width, height = im.size
        assert height == (3 * 9 + 1) * scale and width > (4 * 9 + 1) * scale  # a margin for the names
        margin = width - (4 * 9 + 1) * scale
        pixels = np.asarray(im.convert("L"))
        assert (pixels[:, :margin] < 128).any()  # the names are written in it
        first = pixels[scale : scale + 8 * scale, margin + scale : margin + 9 * scale]  # the first image, enlarged
        assert np.array_equal(first[::scale, ::scale], images[0, 0].numpy())


def test_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    d = load_folder(tmp_path, image_size=16, channels=3)
    assert d.class_names == ["cat", "dog"] and d.shape == (3, 16, 16)
    assert len(d.train_labels) + len(d.test_labels) == 24 and len(d.test_labels) > 0
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable image"):
        load_folder(tmp_path, image_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_folder(tmp_path / "empty")
