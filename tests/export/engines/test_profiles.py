"""TensorRT optimisation profiles derive from the signatures and the targets, and cover what is served."""

import pytest

from diffsr.app.measure.parity import parity_shapes
from diffsr.export.core.errors import DiffsrError
from diffsr.export.engines.build import engine_profiles, profile_json
from diffsr.export.model.dims import TARGETS, target
from diffsr.export.model.families import preset, presets
from diffsr.runtime.tiling import tiling_for


@pytest.mark.parametrize("preset_name", sorted(presets()))
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_profiles_cover_every_input_in_order_min_opt_max(preset_name, name):
    model = preset(preset_name)
    for sub, profile in engine_profiles(model, target(name)).items():
        assert list(profile) == [t.name for t in model.signature(sub).inputs]
        for r in profile.values():
            assert all(lo <= o <= hi for lo, o, hi in zip(r.min, r.opt, r.max)), (sub, r)
            assert r.contains(r.min) and r.contains(r.max)


# written out by hand: the 512x512 benchmark with CFG (latent 64x64, UNet batch 2), tiny widths
TINY_SERVER_OPT = {
    "text_encoder": {"input_ids": (2, 77)},
    "lq_encoder": {"lq_image": (1, 3, 512, 512)},
    "fusion_transformer": {"f1": (1, 64, 64, 64), "sample": (1, 4, 64, 64)},
    "controlnet_unet": {"sample": (2, 4, 64, 64), "timestep": (2,), "text_embeddings": (2, 77, 32),
                        "f2": (1, 32, 64, 64)},
    "vae_decoder": {"latent": (1, 4, 64, 64)},
}


def test_opt_shapes_are_the_benchmark_request():
    profiles = engine_profiles(preset("tiny"), target("server"))
    assert {sub: {k: r.opt for k, r in p.items()} for sub, p in profiles.items()} == TINY_SERVER_OPT
    assert profiles["vae_decoder"]["latent"].min == (1, 4, 8, 8)  # 64 pixels a side
    assert profiles["text_encoder"]["input_ids"].max == (8, 77)  # CFG doubles the 4-image max batch


@pytest.mark.parametrize("preset_name", sorted(presets()))
def test_server_profile_holds_every_parity_shape(preset_name):
    """Parity's shapes are what an engine must run: dit4sr's odd shape (2-cell multiples) is raised to 10 x 14
    cells, above the profiles' least side of 8."""
    model = preset(preset_name)
    profiles = engine_profiles(model, target("server"))
    for label, dims in parity_shapes(model).items():
        assert dims["latent_height"] != dims["latent_width"] or label != "odd"
        for sub, sig in model.signatures().items():
            for name, shape in sig.input_shapes(dims).items():
                assert profiles[sub][name].contains(shape), (label, sub, name, shape)


def test_server_profile_holds_the_benchmark_size():
    model = preset("sd15")
    profiles = engine_profiles(model, target("server"))
    # the benchmark: 512x512 out, CFG, one image -> latent 64x64, UNet batch 2
    assert profiles["controlnet_unet"]["sample"].opt == (2, 4, 64, 64)
    assert profiles["controlnet_unet"]["text_embeddings"].max == (8, 77, 768)
    assert profiles["lq_encoder"]["lq_image"].max == (4, 3, 1024, 1024)


def test_edge_is_one_image_up_to_768_pixels():
    profiles = engine_profiles(preset("sd15"), target("edge"))
    assert profiles["controlnet_unet"]["sample"].max == (2, 4, 96, 96)
    assert profiles["vae_decoder"]["latent"].max == (1, 4, 96, 96)


def test_static_fixes_every_dim_at_its_opt():
    model = preset("tiny")
    for sub, profile in engine_profiles(model, target("server").resized(static=True)).items():
        for name, r in profile.items():
            assert r.min == r.opt == r.max, (sub, name)
    unet = engine_profiles(model, target("server").resized(static=True))["controlnet_unet"]
    assert unet["sample"].opt[0] == 2 and unet["f2"].opt[0] == 1  # CFG doubles the UNet's batch, not f2's


def test_max_batch_widens_the_batch_dims_only():
    model = preset("small")
    wide = engine_profiles(model, target("server").resized(max_batch=8))
    base = engine_profiles(model, target("server"))
    assert wide["controlnet_unet"]["sample"].max == (16, 4, 128, 128)
    assert wide["controlnet_unet"]["f2"].max[0] == 8 and wide["text_encoder"]["input_ids"].max == (16, 77)
    assert wide["controlnet_unet"]["sample"].opt == base["controlnet_unet"]["sample"].opt
    with pytest.raises(DiffsrError, match="--max-batch 0 is below the server target's opt batch 1"):
        target("server").resized(max_batch=0)


def test_profile_json_is_min_opt_max_lists():
    profile = engine_profiles(preset("tiny"), target("edge"))["vae_decoder"]
    assert profile_json(profile) == {"latent": [[1, 4, 8, 8], [1, 4, 64, 64], [1, 4, 96, 96]]}


def test_sdxl_profiles_are_at_its_native_1024_pixels():
    profiles = engine_profiles(preset("sdxl"), target("server"))
    unet = profiles["controlnet_unet"]
    assert unet["sample"].opt == (2, 4, 128, 128) and unet["sample"].max == (8, 4, 256, 256)
    assert unet["text_embeds"].opt == (2, 1280) and unet["time_ids"].max == (8, 6)
    assert unet["text_embeddings"].opt == (2, 77, 2048)
    assert profiles["text_encoder"]["input_ids_2"].opt == (2, 77)
    assert profiles["vae_decoder"]["latent"].opt == (1, 4, 128, 128)  # 1024 x 1024 pixels
    assert engine_profiles(preset("sdxl"), target("edge"))["lq_encoder"]["lq_image"].max == (1, 3, 1536, 1536)


def test_dit4sr_profiles_are_at_its_native_512_pixels_with_t5_fixed():
    """The official tile (64 latent cells, 512 px) is the opt; T5's sequence and the joint text length
    (77 CLIP + 256 T5 tokens) are fixed per engine; the LR latent has the images' batch, not CFG's."""
    model = preset("dit4sr")
    profiles = engine_profiles(model, target("server"))
    dit = profiles["transformer"]
    assert dit["sample"].opt == (2, 16, 64, 64) and dit["sample"].max == (8, 16, 128, 128)
    assert dit["lr_latent"].opt == (1, 16, 64, 64) and dit["lr_latent"].max == (4, 16, 128, 128)
    assert dit["prompt_embeds"].min[1:] == dit["prompt_embeds"].max[1:] == (333, 4096)
    assert profiles["t5_encoder"]["input_ids_3"].min[1] == profiles["t5_encoder"]["input_ids_3"].max[1] == 256
    assert profiles["lr_encoder"]["lq_image"].opt == (1, 3, 512, 512)
    tiling = tiling_for(model, model.defaults)
    assert (tiling.size, tiling.overlap) == (64, 24)  # the official tiles: the engine's opt
    edge = engine_profiles(model, target("edge"))["transformer"]
    assert edge["sample"].max == (2, 16, 96, 96) and edge["prompt_embeds"].max == (2, 333, 4096)


def test_reference_profiles_cover_one_to_ten_references():
    """refsr's reference encoder's engine takes 1 to 10 references at both targets (a request with none never reaches
    it: the stage is not run); the step's profile has no reference dim at all (the step costs the same with any)."""
    from diffsr.export.engines.build import engine_profiles
    from diffsr.export.model.dims import TARGETS
    from diffsr.export.model.families import preset

    model = preset("refsr-tiny")
    for deployment in TARGETS.values():
        profiles = engine_profiles(model, deployment)
        refs = profiles["reference_encoder"]["references"]
        assert (refs.min[0], refs.opt[0], refs.max[0]) == (1, 4, 10) and refs.min[1:] == (3, 32, 32)
        assert profiles["reference_attention"]["reference_kv"].max[0] == 10
        assert "references" not in model.signature("unet").dim_names
