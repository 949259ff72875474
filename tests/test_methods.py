"""Every registry entry on a small attention-shaped model: identity at init, what trains, files, merges."""
import pytest
import torch
from torch import nn

from qrlora.files.checkpoint import (
    adapter_from_model,
    adapter_metadata,
    base_fingerprint,
    load_adapter,
    load_residual,
    residuals_from_adapter,
    save_adapter,
    save_residual,
)
from qrlora.errors import UserError
from qrlora.files.export import export_lora
from qrlora.core.inject import find_target_modules, inject_adapters
from qrlora.core.layers import AdapterLinear, adapter_layers, apply_constraints_, cast_base_model_
from qrlora.merging.merger import Merger
from qrlora.core.methods import METHODS, AdapterConfig, Method


class RowScale(Method):
    """A throwaway method defined only here: frozen Q, R; a trainable per-row scale of R, ``dW = s Q diag(c) R``.

    Registered for this module's tests (fixture below), it runs the parametrized suite unchanged: a new method is
    one class, and nothing outside the registry needs to know its name.
    """

    name = "rowscale_test_only"
    trainable = ("delta_r",)
    basis = ("q", "base_r")
    math_names = {"q": "Q", "base_r": "R", "delta_r": "c"}
    display_name = "row-scaled R (test)"

    def initialize(self, weight, cfg, layer_name):
        full = METHODS["deltaR"].initialize(weight, cfg.with_(method="deltaR"), layer_name)
        coeff = self._coefficients((cfg.rank, 1), cfg, layer_name, weight.device)
        return {"q": full["q"], "base_r": full["base_r"], "delta_r": coeff}

    def output(self, t, x, scale):
        return ((x @ t["base_r"].T) * t["delta_r"].T * scale) @ t["q"].T

    def lora_factors(self, t, scale):
        return t["q"] * (t["delta_r"].T * scale), t["base_r"]

    def basis_product(self, t):
        return t["q"] @ t["base_r"]

    def shapes(self, out_features, in_features, cfg):
        return {"q": (out_features, cfg.rank), "base_r": (cfg.rank, in_features), "delta_r": (cfg.rank, 1)}


@pytest.fixture(autouse=True)
def throwaway_method_registered(monkeypatch):
    monkeypatch.setitem(METHODS, RowScale.name, RowScale())


ALL = [*METHODS, RowScale.name]
STATIC = [m for m in METHODS if METHODS[m].static] + [RowScale.name]
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_out.0"]


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(dim, dim)
        self.attn.to_k = nn.Linear(dim, 2 * dim)  # non-square on purpose
        self.attn.to_q2 = nn.Linear(dim, dim)  # must never match "attn.to_q"
        self.attn.to_out = nn.ModuleList([nn.Linear(2 * dim, dim)])

    def forward(self, x):
        h = torch.tanh(self.attn.to_q(x)) + self.attn.to_q2(x)
        return x + self.attn.to_out[0](torch.relu(self.attn.to_k(h)))


class Toy(nn.Module):
    def __init__(self, dim=32, depth=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.transformer_blocks = nn.ModuleList([Block(dim) for _ in range(depth)])

    def forward(self, x):
        for block in self.transformer_blocks:
            x = block(x)
        return x


def config(method, **kw):
    return AdapterConfig(method=method, rank=8, num_experts=4, **kw)


def train_steps(model, x, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for _ in range(steps):
        loss = (model(x) - 1.0).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        apply_constraints_(model)


def save_trained(tmp_path, method, seed=0, name="a", train_seed=0):
    model, x = Toy(), torch.randn(5, 32, generator=torch.Generator().manual_seed(train_seed))
    cfg = config(method, seed=seed)
    inject_adapters(model, cfg, TARGETS)
    train_steps(model, x)
    adapter = adapter_from_model(model, cfg, adapter_metadata(cfg, component="transformer", backbone="toy", base_model="toy-0"))
    path = tmp_path / f"{name}.safetensors"
    save_adapter(path, adapter)
    return path, model


def test_suffix_matching_is_peft_like():
    names = find_target_modules(Toy(), ["attn.to_q"])
    assert names == ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q"]
    with pytest.raises(UserError, match="attn.to_v"):
        find_target_modules(Toy(), ["attn.to_v"])


@pytest.mark.parametrize("method", ALL)
def test_identity_at_init(method):
    model = Toy()
    x = torch.randn(4, 32)
    before = model(x)
    inject_adapters(model, config(method), TARGETS)
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("method", ["deltaR", "svd", "ica", "triu_deltaR"])
def test_nonzero_init_changes_output(method):
    model = Toy()
    x = torch.randn(4, 32)
    before = model(x)
    inject_adapters(model, config(method, use_zero_init=False, delta_scale=0.05), TARGETS)
    assert not torch.allclose(model(x), before)


@pytest.mark.parametrize("method", ALL)
def test_only_trainable_tensors_change(method):
    model = Toy()
    report = inject_adapters(model, config(method), TARGETS)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == report.trainable_params
    train_steps(model, torch.randn(5, 32))
    after = model.state_dict()
    for key, value in frozen.items():
        if key in trainable:
            assert not torch.equal(after[key], value), f"{key} did not train"
        else:
            assert torch.equal(after[key], value), f"{key} is frozen but changed"


@pytest.mark.parametrize("method", ["deltaR", "triu_deltaR", "svd"])
def test_trainable_count_is_r_times_in(method):
    model = Toy()
    report = inject_adapters(model, config(method), TARGETS)
    ins = sum(model.get_submodule(p).in_features for p in report.layers)
    assert report.trainable_params == 8 * ins
    square = [p for p in report.layers if p.endswith("to_q")]
    layer = model.get_submodule(square[0])
    assert 8 * layer.in_features * 2 == 8 * (layer.in_features + layer.out_features)  # half of LoRA's when square
    assert "trainable parameters" in str(report) and "LoRA" in str(report)


def test_triangularity_kept_after_training():
    model = Toy()
    inject_adapters(model, config("triu_deltaR", use_zero_init=False), TARGETS)
    train_steps(model, torch.randn(5, 32), steps=5)
    for _, layer in adapter_layers(model):
        dR = layer.adapters["default"].delta_r
        assert torch.count_nonzero(torch.tril(dR, diagonal=-1)) == 0
        assert torch.count_nonzero(torch.triu(dR)) > 0


def test_qr_mode_trains_q_and_r():
    model = Toy()
    inject_adapters(model, config("qr"), TARGETS)
    train_steps(model, torch.randn(5, 32))
    for _, layer in adapter_layers(model):
        t = layer.adapters["default"].tensors()
        assert not torch.equal(t["q"], t["q0"]) and not torch.equal(t["base_r"], t["r0"])


@pytest.mark.parametrize("method", ALL)
def test_save_load_round_trip(tmp_path, method):
    path, model = save_trained(tmp_path, method)
    loaded = load_adapter(path)
    assert loaded.config.method == method and loaded.config.rank == 8
    assert loaded.metadata["format"] == "qrlora" and loaded.metadata["backbone"] == "toy"
    for p, layer in adapter_layers(model):
        for name, value in layer.adapters["default"].tensors().items():
            assert torch.equal(loaded.layers[p][name], value.detach())


@pytest.mark.parametrize("method", STATIC)
def test_residual_plus_basis_is_the_weight(tmp_path, method):
    path, model = save_trained(tmp_path, method)
    adapter = load_adapter(path)
    base = {p: layer.base_layer.weight.detach() for p, layer in adapter_layers(model)}
    save_residual(tmp_path / "res.safetensors", residuals_from_adapter(adapter, base))
    residual = load_residual(tmp_path / "res.safetensors")
    for p, named in adapter.layers.items():
        rebuilt = residual[p] + adapter.config.scale * adapter.method.basis_product(named)
        assert torch.allclose(rebuilt, base[p], atol=1e-6)


def test_merge_equals_live_adapters_mixed_methods(tmp_path):
    """Several adapters of different static methods merged at chosen weights == live adapters at those weights."""
    x = torch.randn(6, 32)
    files = [save_trained(tmp_path, m, name=m, train_seed=i)[0] for i, m in enumerate(["triu_deltaR", "svd", "ica", "qr", "lora"])]
    adapters = [load_adapter(f) for f in files]
    weights = [0.7, 1.0, -0.3, 0.5, 1.2]
    live = Toy()
    from qrlora.core.inject import attach_adapter

    for i, (a, w) in enumerate(zip(adapters, weights)):
        attach_adapter(live, a.config, a.layers, adapter_name=f"a{i}", weight=w)
    merged = Toy()
    merger = Merger(merged, adapters)
    merger.merge(weights)
    assert torch.allclose(merged(x), live(x), atol=1e-5)
    # re-merging at other weights starts from the originals: back to 0 gives the exact base model
    merger.merge([0.0] * len(adapters))
    assert torch.equal(merged(x), Toy()(x))


def test_residual_form_equals_delta_form(tmp_path):
    a_path, model = save_trained(tmp_path, "triu_deltaR", name="style", train_seed=1)
    b_path, _ = save_trained(tmp_path, "triu_deltaR", name="content", train_seed=2)
    adapters = [load_adapter(a_path), load_adapter(b_path)]
    base = {p: l.base_layer.weight.detach() for p, l in adapter_layers(model)}
    residual = residuals_from_adapter(adapters[0], base)
    x = torch.randn(3, 32)
    delta, res = Toy(), Toy()
    Merger(delta, adapters).merge([0.8, 1.1])
    Merger(res, adapters, residual=residual).merge([0.8, 1.1])
    assert torch.allclose(delta(x), res(x), atol=1e-5)


def test_residual_form_refuses_different_bases(tmp_path):
    a_path, model = save_trained(tmp_path, "triu_deltaR", name="a")
    b_path, _ = save_trained(tmp_path, "triu_deltaR", name="b", train_seed=1)
    adapters = [load_adapter(a_path), load_adapter(b_path)]
    adapters[1].layers["transformer_blocks.1.attn.to_k"]["q"] *= -1  # as if decomposed from another weight
    base = {p: l.base_layer.weight.detach() for p, l in adapter_layers(model)}
    residual = residuals_from_adapter(adapters[0], base)
    with pytest.raises(UserError, match=r"^layer transformer_blocks\.1\.attn\.to_k: q differs.*delta form"):
        Merger(Toy(), adapters, residual=residual)
    Merger(Toy(), adapters)  # the delta form needs no shared basis


def test_moe_live_merge(tmp_path):
    a_path, _ = save_trained(tmp_path, "moe", name="a", train_seed=1)
    b_path, _ = save_trained(tmp_path, "moe", name="b", train_seed=2)
    adapters = [load_adapter(a_path), load_adapter(b_path)]
    x = torch.randn(3, 32)
    model = Toy()
    merger = Merger(model, adapters)
    merger.merge([0.0, 0.0])
    assert torch.equal(model(x), Toy()(x))
    merger.merge([1.0, 0.5])
    out = model(x)
    assert not torch.allclose(out, Toy()(x))
    with pytest.raises(UserError, match="token-dependent"):
        adapters[0].delta_weights()
    with pytest.raises(UserError, match="a standard LoRA file is a weight change; a moe adapter is token-dependent"):
        export_lora(adapters[0], tmp_path / "x.safetensors")


def test_published_key_layout_loads_and_merges(tmp_path):
    """A file as the published code writes it: no metadata, q / base_r / delta_r keys, alpha = rank."""
    from safetensors.torch import save_file

    model = Toy()
    inject_adapters(model, AdapterConfig(method="deltaR", rank=8), TARGETS)
    train_steps(model, torch.randn(5, 32))
    tensors = {}
    for p, layer in adapter_layers(model):
        t = layer.adapters["default"].tensors()
        tensors[f"transformer.{p}.lora.q.weight"] = t["q"].detach()
        tensors[f"transformer.{p}.lora.base_r.weight"] = t["base_r"].detach()
        tensors[f"transformer.{p}.lora.delta_r.weight"] = t["delta_r"].detach()
    save_file(tensors, tmp_path / "published.safetensors")
    adapter = load_adapter(tmp_path / "published.safetensors")
    assert adapter.config.method == "deltaR" and adapter.config.rank == 8 and adapter.config.lora_alpha == 8
    merged = Toy()
    Merger(merged, [adapter]).merge([1.0])
    x = torch.randn(3, 32)
    assert torch.allclose(merged(x), model(x), atol=1e-5)


@pytest.mark.parametrize("bad", ["missing", "garbage", "truncated", "not_adapter"])
def test_bad_adapter_files(tmp_path, bad):
    path = tmp_path / "bad.safetensors"
    if bad == "garbage":
        path.write_bytes(b"this is not a safetensors file at all")
    elif bad == "truncated":
        good, _ = save_trained(tmp_path, "deltaR")
        path.write_bytes(good.read_bytes()[:-100])
    elif bad == "not_adapter":
        from safetensors.torch import save_file

        save_file({"some.weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match=str(path.name)):
        load_adapter(path)


def test_shapes_that_do_not_fit_are_named(tmp_path):
    path, _ = save_trained(tmp_path, "deltaR")
    adapter = load_adapter(path)
    with pytest.raises(UserError, match=r"a\.safetensors: layer transformer_blocks\.0\.attn\.to_k .*different base model"):
        Merger(Toy(dim=16), [adapter])


def test_different_base_models_refused(tmp_path):
    """Bases are compared by their weights (the recorded fingerprint), not by the path they were opened from."""
    a, model = save_trained(tmp_path, "deltaR", name="a")
    weights = {p: layer.base_layer.weight for p, layer in adapter_layers(model)}
    first, same, other = load_adapter(a), load_adapter(a), load_adapter(a)
    first.metadata["base_fingerprint"] = base_fingerprint(weights)
    same.metadata.update(base_model="/another/path/to/toy-0", base_fingerprint=base_fingerprint(weights))
    other.metadata["base_fingerprint"] = base_fingerprint({p: 2 * w for p, w in weights.items()})
    other.path = "other.safetensors"
    Merger(Toy(), [first, same])  # one model under two paths is one model
    with pytest.raises(UserError, match="different base models"):
        Merger(Toy(), [first, other])


def test_rank_and_moe_errors():
    with pytest.raises(UserError, match=r"--rank 40 exceeds .*transformer_blocks\.0\.attn\.to_q"):
        inject_adapters(Toy(), AdapterConfig(method="deltaR", rank=40), TARGETS)
    with pytest.raises(UserError, match="--moe_num_experts"):
        inject_adapters(Toy(), AdapterConfig(method="moe", rank=6, num_experts=4), TARGETS)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import qrlora.files.checkpoint as ckpt

    path = tmp_path / "out.safetensors"
    path.write_bytes(b"previous")

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save_safetensors({"a": torch.zeros(1)}, path)
    assert path.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [path]


def test_bf16_base_keeps_float32_adapter_and_runs_in_input_dtype():
    model = Toy()
    inject_adapters(model, config("triu_deltaR"), TARGETS)
    cast_base_model_(model, torch.bfloat16)
    layer = next(l for _, l in adapter_layers(model))
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in layer.adapters["default"].tensors().values())
    out = model(torch.randn(2, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and isinstance(layer, AdapterLinear)


@pytest.mark.parametrize("source,expected", [
    (None, "--lora_alpha must be a positive number, got -1.0"),
    ("a.safetensors", "a.safetensors: alpha must be a positive number, got -1.0"),
])
def test_one_rule_for_rank_and_alpha_naming_the_flag_or_the_file(source, expected):
    """The range rules live in AdapterConfig alone; a bad value read from a file names the file, not a flag."""
    build = AdapterConfig if source is None else (lambda **kw: AdapterConfig.from_file(source, **kw))
    with pytest.raises(UserError) as err:
        build(method="lora", rank=4, alpha=-1.0)
    assert str(err.value) == expected
    with pytest.raises(UserError, match="rank must be a positive integer" if source else "--rank must be"):
        build(method="lora", rank=0)


def test_a_file_with_a_negative_alpha_names_the_file(tmp_path):
    from safetensors.torch import save_file

    from qrlora.files.checkpoint import load_adapter

    path = tmp_path / "kohya.safetensors"
    save_file({"transformer.a.lora_A.weight": torch.zeros(2, 8), "transformer.a.lora_B.weight": torch.zeros(8, 2),
               "transformer.a.alpha": torch.tensor(-2.0)}, str(path))
    with pytest.raises(UserError) as err:
        load_adapter(path)
    assert str(err.value).startswith(f"{path}: alpha must be a positive number") and "--lora_alpha" not in str(err.value)
