"""The dry run lists exactly what build_corda adapts."""

from corda_vl import CordaConfig, build_corda, collect_covariances, plan


def test_plan_matches_the_llama_adapter(llama, batches):
    store = collect_covariances(llama, batches, progress=False)
    config = CordaConfig(r=4, rank_pattern={"down_proj": 2}, exclude_modules=["k_proj"])
    dry = plan(llama, config, store)
    text = str(dry)
    assert "down_proj" in text and "text tokens [calib" in text and "k_proj" not in text
    rows = {row.module: row for row in dry.rows}
    assert rows["model.layers.0.mlp.down_proj"].rank == 2 and rows["model.layers.0.mlp.down_proj"].shape == (32, 48)
    model = build_corda(llama, store, config, progress=False)
    adapted = {n: m for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert sorted(adapted) == sorted(rows)
    assert all(adapted[n].r["default"] == rows[n].rank for n in rows)
    assert dry.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert dry.group_totals() == {"language": {"modules": 12, "trainable": dry.trainable, "rank": sum(r.rank for r in dry.rows)}}


def test_plan_for_data_free_methods(llama):
    dry = plan(llama, CordaConfig(method="lora", r=2))
    assert all(row.covariance == "none (data-free)" for row in dry.rows) and len(dry.rows) == 14
    assert dry.to_dicts()[0]["module"] == "model.layers.0.self_attn.q_proj"
