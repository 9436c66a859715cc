import pytest
import torch

from hf_q4shampoo import fidelity
from hf_q4shampoo.config import PRECOND_FORMS, Q4ShampooConfig
from hf_q4shampoo.preconditioners import FORMS, FormSettings, make_form


@pytest.fixture(scope="module")
def dynamic():
    # papers.md §2.5 toy: EMA (beta 0.95) of rank-32 gradients with a log-decaying spectrum,
    # re-quantized at every update; errors vs the fp64 EMA's root, mean of two seeds.
    runs = [fidelity.dynamic_errors(n=256, steps=40, seed=s) for s in (11, 12)]
    return {k: tuple(sum(r[k][i] for r in runs) / len(runs) for i in range(2)) for k in runs[0]}


def test_dynamic_ordering_naive_cholesky_ef(dynamic):
    print("dynamic (NRE, AE deg):", {k: (round(a, 4), round(b, 2)) for k, (a, b) in dynamic.items()})
    nre = {k: v[0] for k, v in dynamic.items()}
    ae = {k: v[1] for k, v in dynamic.items()}
    assert nre["naive"] > 1.4 * nre["cholesky"]  # naive >> cholesky
    assert nre["cholesky"] >= nre["cholesky_ef"] and ae["cholesky"] >= ae["cholesky_ef"]
    assert nre["fp32"] < 0.05 * nre["cholesky_ef"]  # fp32 is the near-exact reference


@pytest.mark.parametrize("spectrum", ["two_values", "log_uniform"])
def test_static_ordering_and_bjorck(spectrum):
    # paper 2 Table 1 / papers.md §2.5 static check on fresh random orthogonal U
    a = fidelity.synthetic_spd(384, spectrum, torch.Generator().manual_seed(7))
    e = fidelity.static_errors(a, eps=1e-6)
    print(spectrum, {k: (round(x, 4), round(y, 2)) for k, (x, y) in e.items()})
    assert e["naive"][0] > 3 * e["cholesky"][0]
    assert e["eigen"][0] < 0.6 * e["eigen_no_bjorck"][0] and e["eigen"][1] < e["eigen_no_bjorck"][1]


def test_one_registry_of_forms_matches_the_config_names():
    assert tuple(FORMS) == PRECOND_FORMS  # config validates the names, the registry builds the forms


def test_form_settings_are_a_view_of_the_config_with_device_choices_resolved():
    config = Q4ShampooConfig(newton_max_iters=7, stat_decay=0.8)
    cpu, gpu = FormSettings.for_device(config, "cpu"), FormSettings.for_device(config, "cuda")
    assert cpu.newton_max_iters == 7 and cpu.stat_decay == 0.8 and cpu.config is config
    assert (cpu.root_method, cpu.gram_tf32) == ("eigh", False)
    assert (gpu.root_method, gpu.gram_tf32) == ("newton", True)
    fp32 = FormSettings.for_device(config.replace(precond="fp32", root_method="eigh"), "cuda")
    assert (fp32.root_method, fp32.gram_tf32) == ("eigh", False)
    assert FormSettings.from_options(newton_max_iters=3).replace(root_bits=32).newton_max_iters == 3


@pytest.mark.parametrize("name", FORMS)
def test_fresh_state_is_eps_identity_with_identity_root(name):
    form = make_form(name, FormSettings.from_options(matrix_eps=1e-3))
    for n in (16, 100):  # fp32-stored and quantized sides
        state = form.init_state(n, 3, torch.device("cpu"))
        torch.testing.assert_close(form.statistics(state), 1e-3 * torch.eye(n).expand(3, n, n), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(form.root(state), torch.eye(n).expand(3, n, n))


def test_fp32_form_tracks_exact_ema_and_root():
    settings = FormSettings.from_options(stat_decay=0.9, matrix_eps=1e-5)
    form = make_form("fp32", settings)
    state = form.init_state(70, 2, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    ref = 1e-5 * torch.eye(70, dtype=torch.float64).expand(2, 70, 70)
    for _ in range(5):
        grad = torch.randn(2, 70, 30, generator=g, dtype=torch.float64)
        gram = grad @ grad.mT
        ref = 0.9 * ref + 0.1 * gram
        form.update_statistics(state, gram.float())
    form.refresh_root(state)
    torch.testing.assert_close(state["stats"].double(), ref, rtol=1e-5, atol=1e-6)
    exact = fidelity.reference_root(ref, 1e-5)
    assert fidelity.nre(exact, form.root(state)) < 1e-4


@pytest.mark.parametrize("name", ["naive", "cholesky", "cholesky_ef", "eigen"])
def test_nonfinite_gram_leaves_statistics_unchanged(name):
    form = make_form(name, FormSettings.from_options())
    state = form.init_state(80, 2, torch.device("cpu"))
    g = torch.randn(2, 80, 80)
    form.update_statistics(state, g @ g.mT)
    before = form.statistics(state)
    bad = torch.randn(2, 80, 80)
    bad[0, 3, 4] = float("inf")
    bad = bad @ bad.mT
    form.update_statistics(state, bad)
    after = form.statistics(state)
    assert torch.isfinite(after).all()
    # block 0 (non-finite gram) keeps its statistics up to re-quantization; block 1 moved
    assert fidelity.nre(before[0], after[0]) < 0.2
    assert fidelity.nre(before[1], after[1]) > 1e-3


@pytest.mark.parametrize("upper", ["refine", "feedback"])
@pytest.mark.parametrize("name", FORMS)
def test_bytes_by_kind_adds_up(name, upper):
    form = make_form(name, FormSettings.from_options(factor_upper=upper))
    state = form.init_state(256, 2, torch.device("cpu"))
    kinds = form.bytes_by_kind(state)
    assert sum(kinds.values()) == sum(t.numel() * t.element_size() for t in state.values())
    n2 = 2 * 256 * 256
    if name == "fp32":
        assert kinds["statistics"] == 4 * n2 and kinds["roots"] == 4 * n2
    else:
        assert kinds["roots"] == 2 * (256 // 2) * (256 // 2)  # 4-bit codes of the packed strict lower triangle
        assert kinds["statistics"] + kinds["error_feedback"] == n2 // 2
        # factor_upper="refine" (default) stores a second code of the factor in the upper triangle, "feedback"
        # paper 1's error-feedback state (only the cholesky_ef form has one)
        assert (kinds["error_feedback"] > 0) == (name == "cholesky_ef" and upper == "feedback")


@pytest.mark.parametrize("name", FORMS)
def test_a_non_finite_gram_keeps_the_statistics(name):
    # The forms' own rule (``_blend``), under the optimizer's skip of non-finite gradients: a block whose gram
    # is not finite keeps its statistics, whether the gradient held a NaN or was finite but so large that
    # G G^T overflowed fp32. The other blocks of the batch move on.
    g = torch.Generator().manual_seed(3)
    form = make_form(name, FormSettings.from_options(root_method="eigh", use_compile=False))
    state = form.init_state(96, 3, torch.device("cpu"))
    grads = torch.randn(3, 96, 80, generator=g)
    form.update_statistics(state, grads @ grads.mT)
    before = form.statistics(state).clone()
    nan_grad, huge = grads[0].clone(), grads[1] * 1e20  # 1e20: G G^T's entries pass fp32's 3.4e38
    nan_grad[3, 5] = float("nan")
    fresh = torch.randn(96, 80, generator=g)
    batch = torch.stack([nan_grad, huge, fresh])
    form.update_statistics(state, batch @ batch.mT)
    after = form.statistics(state)
    assert torch.isfinite(after).all()
    for k in (0, 1):  # re-encoded from the same statistics: equal up to the 4-bit rounding (~5%)
        rel = float(torch.linalg.matrix_norm(after[k] - before[k]) / torch.linalg.matrix_norm(before[k]))
        assert rel < 0.1, (k, rel)
    moved = float(torch.linalg.matrix_norm(after[2] - before[2]) / torch.linalg.matrix_norm(before[2]))
    assert moved > 0.5
    form.refresh_root(state)
    assert torch.isfinite(form.root(state)).all()


# ------------------------------------------------------------------------------------------------
# Storage of the Cholesky factor: factor_scaling ("row" | "column") and factor_upper ("feedback" | "refine")
# ------------------------------------------------------------------------------------------------

FACTOR_OPTIONS = [("row", "feedback"), ("column", "feedback"), ("row", "refine"), ("column", "refine")]


def _ill_conditioned_gradients(n, steps, kappa, seed):
    """Gradients ``Q diag(s)^1/2 Z`` (n x 2n) in a random basis Q, s log-spaced from 1 to 1/kappa (fp64)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), n, dtype=torch.float64)
    return [(q * s.sqrt()) @ torch.randn(n, 2 * n, generator=g, dtype=torch.float64) for _ in range(steps)]


def _small_direction_root_error(form, grads, eps=1e-6, beta=0.95):
    """Mean relative error of the stored statistics' inverse root along the eigenvectors of the smallest 10%
    eigenvalues of the fp64 EMA, after the form has run every update (and the fp64 reference alongside)."""
    n = grads[0].shape[0]
    state = form.init_state(n, 1, torch.device("cpu"))
    exact = eps * torch.eye(n, dtype=torch.float64)
    for gr in grads:
        gram = gr @ gr.T
        exact = beta * exact + (1 - beta) * gram
        form.update_statistics(state, gram.float().unsqueeze(0))
    lam, vec = torch.linalg.eigh(exact)

    def root(a):
        e, v = torch.linalg.eigh(a)
        e = e.clamp_min(0)
        return (v * (e + eps * e.max()).pow(-0.25)) @ v.T

    f_exact, f_stored = root(exact), root(form.statistics(state)[0].double())
    k = n // 10
    along = lambda f: (vec[:, :k] * (f @ vec[:, :k])).sum(0)  # noqa: E731
    return float(((along(f_stored) - along(f_exact)).abs() / along(f_exact)).mean())


@pytest.mark.parametrize("scaling,upper", FACTOR_OPTIONS)
def test_factor_storage_reconstructs_the_statistics(scaling, upper):
    # one update with stat_decay 0 stores exactly this gram: the reconstruction vs fp64, fresh random input
    n = 96
    gr = _ill_conditioned_gradients(n, 1, 1e4, seed=3)[0]
    gram = gr @ gr.T
    errors = {}
    for up in ("feedback", upper):
        settings = FormSettings.from_options(stat_decay=0.0, factor_scaling=scaling, factor_upper=up)
        form = make_form("cholesky_ef", settings)
        state = form.init_state(n, 2, torch.device("cpu"))
        form.update_statistics(state, gram.float().expand(2, n, n))
        stored = form.statistics(state).double()
        ridge = state["ridge"].double()[:, None, None] * torch.eye(n, dtype=torch.float64)
        errors[up] = float((torch.linalg.matrix_norm(stored - ridge - gram) / torch.linalg.matrix_norm(gram)).max())
    print(scaling, upper, {k: f"{v:.2e}" for k, v in errors.items()})
    assert errors[upper] < 0.15  # measured 0.095 (row) / 0.113 (column) with one 4-bit code
    if upper == "refine":  # the second code of the residual: ~8 bits instead of 4
        assert errors["refine"] < 0.2 * errors["feedback"]  # measured 0.10x


def test_refined_factor_keeps_the_small_eigenvalue_directions():
    # issue 14: the 4-bit factor inflates the statistics along the eigenvectors of the small eigenvalues, so
    # the root is too small there; the refined (two-code) factor keeps them (measured: see the printed errors)
    grads = _ill_conditioned_gradients(96, 40, 1e5, seed=5)

    def form(s, u):
        return make_form("cholesky_ef", FormSettings.from_options(factor_scaling=s, factor_upper=u))

    err = {(s, u): _small_direction_root_error(form(s, u), grads) for s, u in FACTOR_OPTIONS}
    err["fp32"] = _small_direction_root_error(make_form("fp32", FormSettings.from_options()), grads)
    print({k: round(v, 4) for k, v in err.items()})
    assert err["fp32"] < 1e-3
    # measured 0.63 (one code, either scaling) vs 0.29 (refined, either scaling)
    assert err[("row", "refine")] < 0.6 * err[("row", "feedback")]
    assert err[("column", "refine")] < 0.6 * err[("row", "feedback")]


def test_refine_bytes_are_statistics_not_error_feedback():
    form = make_form("cholesky_ef", FormSettings.from_options(factor_upper="refine"))
    state = form.init_state(256, 2, torch.device("cpu"))
    kinds = form.bytes_by_kind(state)
    assert kinds["error_feedback"] == 0 and kinds["statistics"] == 2 * 256 * 256 // 2


def test_checkpoint_without_the_factor_fields_is_read_as_paper_1_layout():
    # a checkpoint saved before factor_upper / factor_scaling / first_order_m_map existed holds paper 1's
    # layout: the default optimizer must refuse it (naming the fields), one built with that layout loads it
    from hf_q4shampoo import ConfigError, Q4Shampoo

    old_layout = dict(factor_upper="feedback", factor_scaling="row", first_order_m_map="dynamic")
    w = torch.nn.Parameter(torch.randn(80, 70))
    opt = Q4Shampoo([w], update_freq=1, root_freq=1, **old_layout)
    w.grad = torch.randn(80, 70)
    opt.step()
    saved = opt.state_dict()
    for key in (*old_layout, "first_order_v"):
        del saved["q4shampoo_config"][key]
    with pytest.raises(ConfigError, match="factor_scaling: saved 'row', now 'column'.*factor_upper: saved 'feedback'"):
        Q4Shampoo([w], update_freq=1, root_freq=1).load_state_dict(saved)
    again = Q4Shampoo([w], update_freq=1, root_freq=1, **old_layout)
    again.load_state_dict(saved)
    torch.testing.assert_close(
        again._form(w.device).statistics(again.state[w]["regions"][0]["L"]),
        opt._form(w.device).statistics(opt.state[w]["regions"][0]["L"]),
    )


def _stored_root_error(name: str, root_bits: int, seed: int) -> float:
    """Relative error (``fidelity.nre``) of the stored inverse root against the fp64 root of the form's own
    statistics, after a few updates with ill-conditioned gradients: the storage of the root alone."""
    form = make_form(name, FormSettings.from_options(root_bits=root_bits, matrix_eps=1e-6))
    state = form.init_state(96, 2, torch.device("cpu"))
    for gr in _ill_conditioned_gradients(96, 6, 1e5, seed=seed):
        gram = (gr @ gr.T).float()
        form.update_statistics(state, torch.stack([gram, 2.0 * gram]))
    form.refresh_root(state)
    exact = fidelity.reference_root(form.statistics(state).double(), 1e-6)
    return fidelity.nre(exact, form.root(state).double())


@pytest.mark.parametrize("name", ["cholesky_ef", "eigen"])
def test_eight_bit_roots_are_two_codes_much_closer_to_the_exact_root(name):
    # issue 14: with the early first root the 4-bit roots lose most of the hard family's gain; root_bits=8 adds a
    # second 4-bit code of the residual (docs/results.md §4.7)
    err4, err8 = _stored_root_error(name, 4, seed=21), _stored_root_error(name, 8, seed=21)
    print(name, round(err4, 5), round(err8, 5))
    assert err4 > 1e-3  # the 4-bit root is visibly off: the comparison below means something
    assert err8 < 0.25 * err4  # measured 0.10 (cholesky_ef) and 0.17 (eigen: its root also has the rectified vectors)


def test_eight_bit_roots_bytes_and_fresh_state():
    form = make_form("cholesky_ef", FormSettings.from_options(root_bits=8))
    state = form.init_state(256, 2, torch.device("cpu"))
    torch.testing.assert_close(form.root(state), torch.eye(256).expand(2, 256, 256))
    four = make_form("cholesky_ef", FormSettings.from_options()).init_state(256, 2, torch.device("cpu"))
    kinds, kinds4 = form.bytes_by_kind(state), make_form("cholesky_ef", FormSettings.from_options()).bytes_by_kind(four)
    assert kinds["roots"] == 2 * kinds4["roots"]  # the second code is as large as the first
    assert kinds["statistics"] == kinds4["statistics"]
    second = [state[k] for k in ("root_res_scales", "root_res_scale_exp")]  # one byte per block, one int32 per root
    assert second[0].dtype == torch.uint8 and second[1].shape == (2,)
    assert kinds["scales_diagonals"] == kinds4["scales_diagonals"] + sum(t.numel() * t.element_size() for t in second)
    assert sum(kinds.values()) == sum(t.numel() * t.element_size() for t in state.values())
