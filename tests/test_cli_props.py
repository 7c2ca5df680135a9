"""Property-based tests (hypothesis) of CLI argument parsing (issue 8 item 4; the sampler maths are in
tests/test_diffusion_props.py).

Two kinds of properties:
- the parsers behind the options (label lists, batch lists, shard specs, backend specs, variant names, providers)
  return exactly the documented value for every valid input, and for ANY text either return a valid value or raise a
  one-line DitDeployError, never another exception;
- through the real CLI entry point (in-process): every out-of-range number for steps / cfg / batch / lr / ... ends in
  exit code 2 and one ``error:`` line naming the option, before any model is loaded or anything is written.
"""

from __future__ import annotations

import math
import re
import string

import pytest
from conftest import assert_one_line_error, run_main
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ditdeploy.errors import DitDeployError

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLI = settings(max_examples=25, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# text that looks like what people type into a comma-separated option, plus arbitrary unicode
SPEC_ALPHABET = string.digits + ",- +\t/.:xe"
spec_text = st.one_of(st.text(SPEC_ALPHABET, max_size=20), st.text(max_size=20))


def _one_line_user_error(exc: BaseException) -> None:
    """A user error with a message (messages may echo the user's text, newlines included: the CLI prints them
    on one line, see test_cli_echoed_newlines_stay_on_one_line)."""
    assert isinstance(exc, DitDeployError), f"{type(exc).__name__}: {exc}"
    assert str(exc).strip()


def _spaced(values: list[int], seps: list[str]) -> str:
    return "".join(f"{sep}{v}" if i else f"{v}" for i, (v, sep) in enumerate(zip(values, seps, strict=False)))


# --------------------------------------------------------------------------------------------------------- --batch
@FAST
@given(st.lists(st.integers(1, 4096), min_size=1, max_size=8), st.data())
def test_batch_list_valid(values, data):
    from ditdeploy.bench.harness import parse_batches as _parse_batches

    seps = data.draw(st.lists(st.sampled_from([",", ", ", " ,", ",  "]), min_size=len(values),
                              max_size=len(values)))
    spec = _spaced(values, seps) + data.draw(st.sampled_from(["", ",", ", "]))
    assert _parse_batches(spec) == sorted(set(values))


@FAST
@given(st.lists(st.integers(-100, 100), min_size=1, max_size=6))
def test_batch_list_with_a_nonpositive_size_is_refused(values):
    from ditdeploy.bench.harness import parse_batches as _parse_batches

    assume(any(v < 1 for v in values))
    with pytest.raises(DitDeployError, match="--batch"):
        _parse_batches(",".join(map(str, values)))


@FAST
@given(spec_text)
def test_batch_list_any_text(spec):
    from ditdeploy.bench.harness import parse_batches as _parse_batches

    try:
        out = _parse_batches(spec)
    except Exception as e:  # noqa: BLE001 - the property: only a one-line DitDeployError
        _one_line_user_error(e)
        return
    assert out and out == sorted(set(out)) and all(isinstance(b, int) and b >= 1 for b in out)


# --------------------------------------------------------------------------------------------------------- --labels
@FAST
@given(st.integers(1, 1000), st.data())
def test_label_list_valid(num_classes, data):
    from ditdeploy.run.generation import parse_labels

    labels = data.draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=10))
    k = data.draw(st.none() | st.integers(1, 5))
    seps = data.draw(st.lists(st.sampled_from([",", ", ", " , "]), min_size=len(labels), max_size=len(labels)))
    out, row = parse_labels(_spaced(labels, seps), k, num_classes)
    kk = k or 1
    assert out == [v for v in labels for _ in range(kk)]
    assert row == (kk if kk > 1 else None)


@FAST
@given(st.integers(1, 1000), st.lists(st.integers(-2000, 2000), min_size=1, max_size=6))
def test_label_out_of_range_is_named(num_classes, labels):
    from ditdeploy.run.generation import parse_labels

    bad = [v for v in labels if not 0 <= v < num_classes]
    assume(bad)
    with pytest.raises(DitDeployError) as e:
        parse_labels(",".join(map(str, labels)), None, num_classes)
    msg = str(e.value)
    assert "out of range" in msg and str(bad[0]) in msg and f"0..{num_classes - 1}" in msg


@FAST
@given(spec_text, st.integers(1, 1000))
def test_label_list_any_text(spec, num_classes):
    from ditdeploy.run.generation import parse_labels

    try:
        out, _ = parse_labels(spec, None, num_classes)
    except Exception as e:  # noqa: BLE001
        _one_line_user_error(e)
        return
    assert out and all(0 <= v < num_classes for v in out)


@FAST
@given(st.integers(1, 100), st.integers(-5, 0))
def test_num_per_label_must_be_positive(num_classes, k):
    from ditdeploy.run.generation import DEFAULT_PER_LABEL_SMALL, parse_labels

    with pytest.raises(DitDeployError, match="--num-per-label"):
        parse_labels(None, k, num_classes)
    out, row = parse_labels(None, None, num_classes)  # the default grid: every class, DEFAULT_PER_LABEL_SMALL times
    assert out == [c for c in range(num_classes) for _ in range(DEFAULT_PER_LABEL_SMALL)]
    assert row == DEFAULT_PER_LABEL_SMALL


# --------------------------------------------------------------------------------------------------------- --shard
@FAST
@given(st.integers(1, 512), st.data())
def test_shard_spec_valid_and_covering(count, data):
    from ditdeploy.run.shard_workers import parse_shard, shard_range

    index = data.draw(st.integers(0, count - 1))
    assert parse_shard(f"{index}/{count}") == (index, count)
    n = data.draw(st.integers(0, 5000))
    ranges = [shard_range(n, i, count) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, disjoint
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(spec_text)
def test_shard_spec_any_text(spec):
    from ditdeploy.run.shard_workers import parse_shard

    try:
        i, k = parse_shard(spec)
    except Exception as e:  # noqa: BLE001
        _one_line_user_error(e)
        return
    assert 0 <= i < k


# --------------------------------------------------------------------------------------------------------- backends
@FAST
@given(st.one_of(st.sampled_from(["onnxruntime", "ORT", "onnx", "openvino", "ov:bf16", "openvino:f32", "trt",
                                  "tensorrt:x", "torch", "PyTorch", "openvino:"]), st.text(max_size=15)))
def test_backend_spec_any_text(spec):
    from ditdeploy.bench.harness import parse_backend_spec
    from ditdeploy.runtimes import backend_names, options_for

    try:
        name, opts, label = parse_backend_spec(spec)
    except Exception as e:  # noqa: BLE001
        _one_line_user_error(e)
        return
    assert name in backend_names() and label.split(":")[0] == name
    assert set(opts) <= set(options_for(name))  # KEY=VALUE options are checked against the backend's own set


@FAST
@given(st.sampled_from([".onnx", ".xml", ".plan", ".engine", ".trt", ".safetensors", ".pt", ".pth", ".bin", "",
                        ".ONNX", ".npz"]),
       st.one_of(st.none(), st.sampled_from(["onnxruntime", "ort", "openvino", "OV", "tensorrt", "trt", "torch",
                                             "pytorch"]), st.text(max_size=10)))
def test_resolve_backend_any_suffix_and_name(suffix, backend):
    from ditdeploy.runtimes import backend_names, get_backend, resolve_backend

    try:
        b = resolve_backend(f"model{suffix}", backend)
    except Exception as e:  # noqa: BLE001
        _one_line_user_error(e)
        return
    assert b in backend_names() and suffix.lower() in get_backend(b).reads


@FAST
@given(st.one_of(st.text(max_size=30), st.lists(st.sampled_from(["cpu", "cuda", "tensorrt", "CPUExecutionProvider",
                                                                  "x", " cpu "]), max_size=4).map(",".join)))
def test_ort_providers_any_text(requested):
    from ditdeploy.runtimes.onnxruntime import choose_providers

    available = ["CPUExecutionProvider"]
    try:
        out = choose_providers(requested, available)
    except Exception as e:  # noqa: BLE001
        _one_line_user_error(e)
        return
    assert out[-1] == "CPUExecutionProvider" and set(out) <= set(available)


# --------------------------------------------------------------------------------------------------------- --model
@FAST
@given(st.one_of(st.text(max_size=12), st.sampled_from(["XL/2", "xl/2", "DiT-XL/2", "dit-b/4", "S/8", "digits",
                                                        "L/3", "XL2", "s/2 "])),
       st.sampled_from([256, 512, 128, 250, 8]))
def test_variant_names_any_text(name, image_size):
    from ditdeploy.config.variants import VARIANTS, variant_config

    try:
        cfg = variant_config(name, image_size)
    except Exception as e:  # noqa: BLE001
        _one_line_user_error(e)
        return
    if name == "digits" or name.upper() == "DIGITS":
        assert cfg.variant == "digits"
        return
    key = name.upper().replace("DIT-", "")
    assert key in VARIANTS and cfg.variant == key
    assert cfg.input_size == image_size // 8 and cfg.input_size % cfg.patch_size == 0
    assert (cfg.hidden_size, cfg.depth, cfg.patch_size) == tuple(VARIANTS[key][k] for k in
                                                                 ("hidden_size", "depth", "patch_size"))


# --------------------------------------------------------------------------------------------------------- real CLI
def _numbers_outside(lo: float, hi: float):
    """Integers outside [lo, hi]."""
    return st.one_of(st.integers(-10**9, int(lo) - 1), st.integers(int(hi) + 1, 10**9))


@CLI
@given(_numbers_outside(1, 1000))
def test_cli_sample_steps_out_of_range(digits_artifacts, tmp_path_factory, steps):
    out = tmp_path_factory.mktemp("o") / "g.png"
    code, _, err = run_main(["sample", "--engine", digits_artifacts["onnx"], "--steps", str(steps), "--out", out])
    assert code == 2
    # the parser names the bound that was crossed (the range is 1..1000)
    assert_one_line_error(code, err, ("--steps", "greater than or equal to 1" if steps < 1 else
                                      "less than or equal to 1000"))
    assert not out.exists()


@CLI
@given(st.one_of(st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=True), st.just(math.nan),
                 st.just(math.inf)))
def test_cli_sample_cfg_out_of_range(digits_artifacts, tmp_path_factory, cfg):
    out = tmp_path_factory.mktemp("o") / "g.png"
    code, _, err = run_main(["sample", "--engine", digits_artifacts["onnx"], "--cfg-scale", repr(cfg), "--out", out,
                             "--steps", "2"])
    assert code == 2
    assert_one_line_error(code, err, ("--cfg-scale",))
    assert not out.exists()


@CLI
@given(st.text(string.ascii_letters + string.punctuation + " ", min_size=1, max_size=8))
def test_cli_nonnumeric_steps_is_a_usage_error(digits_artifacts, spec):
    assume(not re.fullmatch(r"\s*[+-]?\d+\s*", spec) and not spec.startswith("-"))
    code, _, err = run_main(["sample", "--engine", digits_artifacts["onnx"], "--steps", spec])
    assert code == 2
    assert_one_line_error(code, err, ("--steps",))


@CLI
@given(st.sampled_from(["--steps", "--batch-size", "--timesteps"]), st.integers(-10**6, 0))
def test_cli_check_counts_must_be_positive(digits_artifacts, option, value):
    code, _, err = run_main(["check", "--engine", digits_artifacts["onnx"], option, str(value)])
    assert code == 2
    assert_one_line_error(code, err, (option,))


@CLI
@given(st.one_of(st.lists(st.integers(-50, 0), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))),
                 st.text("abc;. x", min_size=1, max_size=6)))
def test_cli_bench_bad_batch_list(digits_artifacts, tmp_path_factory, spec):
    out = tmp_path_factory.mktemp("o") / "b.json"
    code, _, err = run_main(["bench", "--engine", digits_artifacts["onnx"], "--batch-sizes", spec, "--json", out])
    assert code == 2
    assert_one_line_error(code, err, ("--batch-sizes",))
    assert not out.exists()


@CLI
@given(st.sampled_from(["--samples", "--steps", "--timesteps", "--batch-size"]), st.integers(-1000, 0))
def test_cli_calibrate_counts_must_be_positive(digits_artifacts, tmp_path_factory, option, value):
    out = tmp_path_factory.mktemp("o") / "c.npz"
    code, _, err = run_main(["calibrate", "--engine", digits_artifacts["onnx"], option, str(value), "--out", out])
    assert code == 2
    assert_one_line_error(code, err, (option,))
    assert not out.exists()


@CLI
@given(st.one_of(
    st.tuples(st.just("--steps"), st.integers(-10**6, 0).map(str)),
    st.tuples(st.just("--global-batch"), st.integers(-10**6, 0).map(str)),
    st.tuples(st.just("--lr"), st.one_of(st.floats(max_value=0.0, allow_nan=False), st.just(math.nan),
                                         st.just(math.inf)).map(repr)),
    st.tuples(st.just("--ema-decay"), st.one_of(st.floats(max_value=-1e-9, allow_nan=False),
                                                st.floats(min_value=1.0, allow_nan=False)).map(repr)),
    st.tuples(st.just("--weight-decay"), st.floats(max_value=-1e-9, allow_nan=False).map(repr)),
))
def test_cli_train_numbers_out_of_range(tmp_path_factory, opt_value):
    option, value = opt_value
    out = tmp_path_factory.mktemp("run") / "run"
    code, _, err = run_main(["train", "--preset", "digits", option, value, "--out", out])
    assert code == 2
    assert_one_line_error(code, err, (option,))
    assert not out.exists()


@CLI
@given(st.one_of(st.tuples(st.just("--opset"), st.integers(-5, 16)),
                 st.tuples(st.just("--max-batch"), st.integers(-100, 0))))
def test_cli_export_numbers_out_of_range(digits_artifacts, tmp_path_factory, opt_value):
    option, value = opt_value
    out = tmp_path_factory.mktemp("o") / "m.onnx"
    code, _, err = run_main(["export", "--checkpoint", digits_artifacts["ckpt"], option, str(value), "--out", out])
    assert code == 2
    assert_one_line_error(code, err, (option,))
    assert not out.exists()


@CLI
@given(st.sampled_from(["--labels", "--sampler", "--backend", "--provider"]),
       st.text(string.ascii_letters + string.digits + ",\n\r\t ", min_size=1, max_size=10).filter(
           lambda v: "\n" in v or "\r" in v))
def test_cli_echoed_newlines_stay_on_one_line(digits_artifacts, tmp_path_factory, option, value):
    """Options whose (bad) value is echoed in the error message: a value with newlines still gives one line."""
    assume(not value.lstrip().startswith("-"))
    out = tmp_path_factory.mktemp("o") / "g.png"
    code, _, err = run_main(["sample", "--engine", digits_artifacts["onnx"], "--steps", "2", "--no-progress",
                             option, value, "--out", out])
    if code == 0:  # e.g. "--labels '1\n'" is a valid label list
        assert option == "--labels" and out.exists()
        return
    assert_one_line_error(code, err, ())
    assert not out.exists()
