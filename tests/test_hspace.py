"""ldm_lite.hspace: PCA recovers planted directions; the probe records and edits h through `mid_block_hook`
without touching the sampler; edits replay x_T and the noise so only the edit differs."""
import pytest
import torch
from torch import nn

from ldm_lite import DDIMScheduler, DDPMScheduler, hspace
from ldm_lite.models.unet import UNet, unet_preset


pytestmark = pytest.mark.usefixtures("one_thread")


def planted_activations(n=400, shape=(64, 4, 4), stds=(3.0, 1.5), noise=0.1, seed=0):
    """h (n, *shape) = sum_k std_k a_k u_k + noise * white, with orthonormal planted directions u_k (K, D)."""
    g = torch.Generator().manual_seed(seed)
    dim = torch.Size(shape).numel()
    directions, _ = torch.linalg.qr(torch.randn(dim, len(stds), generator=g, dtype=torch.float64))
    amounts = torch.randn(n, len(stds), generator=g, dtype=torch.float64) * torch.tensor(stds, dtype=torch.float64)
    h = amounts @ directions.T + noise * torch.randn(n, dim, generator=g, dtype=torch.float64) + 0.7
    return h.reshape(n, *shape), directions.T


@pytest.mark.parametrize("method", ["svd", "lowrank"])
def test_pca_recovers_planted_directions(method):
    h, planted = planted_activations()
    result = hspace.pca(h, 3, method=method)
    assert result.directions.shape == (3, 1024) and result.shape == (64, 4, 4)
    for k, expected_std in enumerate((3.0, 1.5)):
        # noise tilts a sample PC by sin^2 ~ (D / n) noise^2 (std^2 + noise^2) / std^4: cos ~ 0.999 and ~0.994
        assert abs(float(result.directions[k] @ planted[k])) > 0.98
        # std of the projections: the planted std (sampled from 400 draws: +-10 %) plus a little noise
        assert float(result.std[k]) == pytest.approx(expected_std, rel=0.1)
    torch.testing.assert_close(result.directions @ result.directions.T, torch.eye(3, dtype=torch.float64), atol=1e-8,
                               rtol=0)
    total = 3.0 ** 2 + 1.5 ** 2 + 1024 * 0.1 ** 2
    assert float(result.explained[0]) == pytest.approx(9.0 / total, rel=0.15)
    torch.testing.assert_close(result.mean, h.reshape(400, -1).mean(dim=0))
    # sign convention: the largest-magnitude entry is positive, so the result does not depend on the solver
    assert (result.directions.gather(1, result.directions.abs().argmax(dim=1, keepdim=True)) > 0).all()
    offset = result.offset(0, 2.0)
    torch.testing.assert_close(offset.flatten(), 2.0 * result.std[0] * result.directions[0])


def test_pca_per_timestep_aligns_signs_and_joint_pca_spans_timesteps():
    """Steps 900 and 100 plant u, step 500 a nearly equal u' whose largest-magnitude entry is negative: the sign
    convention alone would return -u' there; alignment along sampling order must give +u'."""
    g = torch.Generator().manual_seed(1)
    base = 0.02 * torch.randn(256, generator=g, dtype=torch.float64)
    u, u_flip = base.clone(), base.clone()
    u[:2] = torch.tensor([0.5, -0.4], dtype=torch.float64)
    u_flip[:2] = torch.tensor([0.4, -0.5], dtype=torch.float64)
    planted = {900: u / u.norm(), 500: u_flip / u_flip.norm(), 100: u / u.norm()}
    amount = 3 * torch.randn(300, 1, generator=g, dtype=torch.float64)  # per sample, shared by the timesteps
    h = torch.stack([amount * planted[t] + 0.1 * torch.randn(300, 256, generator=g, dtype=torch.float64)
                     for t in planted])
    captured = {"timesteps": torch.tensor(list(planted)), "h": h.reshape(3, 300, 16, 4, 4)}
    assert float(hspace.pca(captured["h"][1], 1).directions[0] @ planted[500]) < 0  # what the convention gives
    per_step = hspace.pca_per_timestep(captured, 2)
    assert list(per_step) == [900, 500, 100]
    for t in planted:
        assert float(per_step[t].directions[0] @ planted[t]) > 0.98  # all the same way round
    joint = hspace.pca_all_timesteps(captured, 2)  # one direction: the three planted slices together
    assert joint.shape == (3, 16, 4, 4) and joint.timesteps == (900, 500, 100)
    expected = torch.cat(list(planted.values())) / 3 ** 0.5
    assert abs(float(joint.directions[0] @ expected)) > 0.98
    assert float(joint.std[0]) == pytest.approx(3 * 3 ** 0.5, rel=0.1)  # |amount| * |concatenation| = 3 sqrt(3)
    sliced = hspace.pca_edit(joint, component=0, scale=1.0)
    torch.testing.assert_close(sliced.offset_at(500), joint.offset(0, 1.0)[1])
    edit = hspace.pca_edit(per_step, component=0, scale=1.5, timesteps=[900])
    assert edit.offset_at(500) is None
    torch.testing.assert_close(edit.offset_at(900), per_step[900].offset(0, 1.5))
    with pytest.raises(ValueError, match="num_components"):
        hspace.pca(torch.zeros(5, 3), 6)


class LinearStandIn(nn.Module):
    """A model with the UNet's h-space interface: h = A x + t_embedding, output = B hook(h). Linear, so the
    effect of an edit on the output is known exactly: B offset."""

    def __init__(self):
        super().__init__()
        self.config = unet_preset("tiny", sample_size=8, in_channels=2)
        self.encode = nn.Conv2d(2, 6, 2, stride=2)
        self.decode = nn.ConvTranspose2d(6, 2, 2, stride=2, bias=False)
        self.mid_block_hook = None
        self.seen = []

    def forward(self, x, timesteps, class_labels=None):
        h = self.encode(x) + timesteps.float().view(-1, 1, 1, 1) / 1000
        self.seen.append(h.detach().clone())
        if self.mid_block_hook is not None:
            h = self.mid_block_hook(h)
        return self.decode(h)


def test_probe_records_and_edits_through_the_hook():
    torch.manual_seed(0)
    model = LinearStandIn()
    x = torch.randn(3, 2, 8, 8)
    timesteps = torch.full((3,), 700)
    probe = hspace.HSpaceProbe(model, record=True)
    plain = probe(x, timesteps)
    assert model.mid_block_hook is None  # restored after the call
    torch.testing.assert_close(probe.records[700][0], model.seen[-1])
    offset = torch.randn(6, 4, 4)
    edited = hspace.HSpaceProbe(model, edit=hspace.HEdit(offset, frozenset({700})))(x, timesteps)
    expected = plain + model.decode(offset.expand(3, -1, -1, -1))
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)
    untouched = hspace.HSpaceProbe(model, edit=hspace.HEdit(offset, frozenset({100})))(x, timesteps)
    torch.testing.assert_close(untouched, plain)
    with pytest.raises(ValueError, match="mid_block_hook"):
        hspace.HSpaceProbe(nn.Linear(2, 2))


def test_probe_restores_the_hook_when_the_model_fails():
    model = LinearStandIn()
    with pytest.raises(RuntimeError):
        hspace.HSpaceProbe(model, record=True)(torch.zeros(1, 3, 8, 8), torch.zeros(1))  # wrong channels
    assert model.mid_block_hook is None


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(unet_preset("tiny", sample_size=8)).eval()


def test_capture_h_on_a_unet_along_sampling(tiny_unet):
    scheduler = DDIMScheduler()
    captured = hspace.capture_h(tiny_unet, scheduler, 6, num_inference_steps=4, batch_size=4, progress=False, seed=0)
    assert captured["timesteps"].tolist() == scheduler.timesteps.tolist()
    assert captured["h"].shape == (4, 6, 64, 2, 2)  # (steps, samples, C_mid = 32 * 2, 8 / 4, 8 / 4)
    assert captured["samples"].shape == (6, 3, 8, 8)
    assert tiny_unet.mid_block_hook is None
    limited = hspace.capture_h(tiny_unet, scheduler, 2, record_timesteps=[scheduler.timesteps[1]], progress=False)
    assert limited["timesteps"].tolist() == [int(scheduler.timesteps[1])]


def test_edits_replay_the_same_noise(tiny_unet):
    """DDPM draws fresh noise every step: a zero edit must reproduce the unedited samples bit for bit (same x_T,
    same generator seed), and a real edit must change them."""
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(5)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = hspace.sample_with_edit(tiny_unet, scheduler, x_T, None, seed=3, progress=False)
    zero = hspace.sample_with_edit(tiny_unet, scheduler, x_T, hspace.HEdit(torch.zeros(64, 2, 2)), seed=3,
                                   progress=False)
    assert torch.equal(plain, zero)
    other_seed = hspace.sample_with_edit(tiny_unet, scheduler, x_T, None, seed=4, progress=False)
    assert not torch.equal(plain, other_seed)
    h, _ = planted_activations(n=50, shape=(64, 2, 2))
    directions = hspace.pca(h, 2)
    first_steps = scheduler.timesteps[:2].tolist()
    grid = hspace.edit_grid(tiny_unet, scheduler, directions, [0, 1], [-2.0, 0.0, 2.0], x_T, timesteps=first_steps,
                            seed=3, progress=False)
    assert grid.shape == (2, 3, 2, 3, 8, 8)
    assert torch.equal(grid[0, 1], plain) and torch.equal(grid[1, 1], plain)  # scale 0 = unedited
    change = (grid - plain).abs().mean(dim=(2, 3, 4, 5))
    assert (change[:, [0, 2]] > 1e-3).all()
