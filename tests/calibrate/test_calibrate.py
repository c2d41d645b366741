import pytest
import torch

from sinkquant import CalibrationReport, calibrate
from sinkquant.data import calibration_samples

SAMPLES = 8  # of 512 tokens: half of SmolLM2's (layer, head) pairs sink on token 0 in every sample


@pytest.fixture(scope="module")
def smollm2_report(smollm2, c4_path):
    model, tok = smollm2
    return calibrate(model, tok, c4_path, samples=SAMPLES, seq_len=512, seed=0, progress=False)


def _independent_sink0(model, input_ids, epsilon=0.3):
    """Sink_0^eps with plain transformers code: eager attention maps, mean over later queries."""
    model.set_attn_implementation("eager")
    try:
        sums = None
        with torch.no_grad():
            for i in range(input_ids.shape[0]):
                out = model(input_ids=input_ids[i : i + 1], output_attentions=True, use_cache=False)
                per_layer = torch.stack(
                    [a[0, :, 1:, 0].float().mean(dim=-1) for a in out.attentions]
                )  # [L, H]
                sums = per_layer if sums is None else sums + per_layer
        means = sums / input_ids.shape[0]
        return float((means > epsilon).float().mean())
    finally:
        model.set_attn_implementation("sdpa")


def test_smollm2_sinks_match_independent_computation(smollm2, smollm2_report, c4_path):
    report = smollm2_report
    model, tok = smollm2
    assert 0 in report.sinks.positions
    share = report.sinks.score[0]
    assert 0.45 <= share <= 0.60
    ids = calibration_samples(tok, c4_path, SAMPLES, 512, seed=0).input_ids
    assert abs(share - _independent_sink0(model, ids)) <= 0.01
    # the sink heads sit in the upper two thirds of the layers
    heads = torch.tensor(report.sinks.head_scores)
    assert (heads[: report.num_layers // 3] <= 0.3).all()


def test_smollm2_massive_activations(smollm2_report):
    report = smollm2_report
    assert 507 in report.massive.dims
    middle = report.num_layers // 2
    # from the middle layers on position 0 carries |h| > 10,000 in dim 507; the last two layers shrink it
    # again (12.7k, 6.7k) as the model turns the residual stream into next-token logits
    for layer in report.massive.layers[middle:-2]:
        assert layer.position0_max_abs > 10_000
        assert layer.position0_dim == 507
    assert report.massive.first_layer is not None and report.massive.first_layer <= middle


def test_smollm2_linear_outliers_reported(smollm2_report):
    report = smollm2_report
    stats = report.linear["model.layers.20.mlp.down_proj"]
    assert stats.in_features == 1536 and len(stats.max_abs) == 1536
    assert stats.top_max_abs[0] == pytest.approx(max(stats.max_abs), rel=1e-3)
    assert stats.outlier_channels(0.01, "max")[0] == stats.top_channels[0]


def test_smollm2_input_means_match_a_direct_pass(smollm2, smollm2_report, c4_path):
    """mean |x| and mean x² per input channel of a linear layer, over all tokens and without the sink
    rows, equal the same means taken from the layer's inputs by a hook on a plain forward pass."""
    model, tok = smollm2
    report = smollm2_report
    name = "model.layers.20.mlp.down_proj"
    rows = report.sink_rows
    assert rows == [0]
    seen = []
    module = model.get_submodule(name)
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double()))
    try:
        with torch.no_grad():
            for sample in calibration_samples(tok, c4_path, SAMPLES, 512, seed=0).input_ids:
                model(input_ids=sample[None])
    finally:
        handle.remove()
    x = torch.cat(seen)  # [samples, 512, 1536]
    rest = x[:, 1:]
    stats = report.linear[name]
    expected = {
        "mean_abs": x.abs().mean((0, 1)),
        "mean_square": x.square().mean((0, 1)),
        "mean_abs_without_sinks": rest.abs().mean((0, 1)),
        "mean_square_without_sinks": rest.square().mean((0, 1)),
    }
    for field, want in expected.items():
        got = torch.tensor(getattr(stats, field), dtype=torch.float64)
        assert torch.allclose(got, want, rtol=2e-3, atol=1e-6), field
    # somewhere the sink token's inputs alone outweigh all other tokens' in a channel's mean x²
    ratios = [
        max(a / max(b, 1e-12) for a, b in zip(st.mean_square, st.mean_square_without_sinks, strict=True))
        for st in report.linear.values()
        if st.mean_square_without_sinks is not None
    ]
    assert max(ratios) > 10


def test_report_round_trips_through_json(smollm2_report, tmp_path):
    report = smollm2_report
    path = report.save(tmp_path / "calib.json")
    again = CalibrationReport.load(path)
    assert again.to_dict() == report.to_dict()
    data = again.to_dict()
    for key in ("schema_version", "model", "tokens", "sinks", "massive", "linear"):
        assert key in data
    assert isinstance(data["sinks"]["positions"], list) and "0" in data["sinks"]["score"]


def test_stories260k_reports_no_sinks_and_no_massive_dims(stories, tmp_path):
    model, tok = stories
    report = calibrate(model, tok, None, samples=8, seq_len=256, progress=False)
    assert report.sinks.positions == []
    assert report.sinks.content == []
    assert report.sinks.found is False and "no attention sinks" in report.sinks.note
    assert report.massive.dims == []
    assert report.bos is True


def test_plots_are_written(stories, tmp_path):
    from sinkquant.calibrate.plots import save_plots

    model, tok = stories
    report = calibrate(model, tok, None, samples=2, seq_len=128, progress=False)
    paths = save_plots(report, tmp_path / "plots")
    assert [p.name for p in paths] == ["attention_position0.png", "massive_activations.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
