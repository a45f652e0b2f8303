"""SD 1.x/2.x, SDXL, SD3, FLUX and SANA folders as teachers: their conditions are what the folder's own pipeline's
`encode_prompt` gives, to 1e-6 (pooled embedding, time ids, T5, SANA's instruction and attention mask, null
convention), and the network sees them as the pipeline passes them (FLUX: packed 2x2 patches, image ids, embedded
guidance)."""
import pytest
import torch

from stepdistill.models.conditioning import unpack_pooled
from stepdistill.teachers.sd import SDConfig, SDTeacher, sana_instruction

PROMPTS = ["a red shirt", "a blue bag"]
EXACT = dict(rtol=0, atol=1e-6)  # the same encoder on the same tokens: only float rounding may differ


@pytest.fixture(scope="module", params=["sd", "sd2", "sdxl", "sd3", "sd3-no-t5", "flux", "sana"])
def family_teacher(request, tmp_path_factory):
    import conftest

    root = tmp_path_factory.mktemp(request.param)
    if request.param == "sd3-no-t5":
        folder = conftest.make_tiny_sd3_folder(root / "sd3", t5=False)
    elif request.param == "sd2":
        folder = conftest.make_tiny_sd_folder(root / "sd2", sd2=True)
    else:
        folder = getattr(conftest, f"make_tiny_{request.param}_folder")(root / request.param)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    size = {"resolution": 16} if request.param == "flux" else {}
    return request.param, SDTeacher(SDConfig(path=str(folder), prompts=str(root / "prompts.txt"), **size))


def pipeline_of(teacher):
    import diffusers

    no_t5 = dict(text_encoder_3=None, tokenizer_3=None) \
        if teacher.text.components().get("text_encoder_3", 0) is None else {}
    pipe = getattr(diffusers, teacher.pipeline).from_pretrained(teacher.folder, local_files_only=True, **no_t5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditions_are_what_the_pipeline_encodes(family_teacher):
    family, t = family_teacher
    pipe = pipeline_of(t)
    cond = t.text(PROMPTS)
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu")
        assert cond.shape == (2, 513, 32) and t.text.null == "empty" and t.shape == (4, 8, 8)
        close = dict(rtol=1e-4, atol=1e-4)  # T5 in another batch composition: float rounding
        torch.testing.assert_close(cond[:, :-1], embeds, **close)
        torch.testing.assert_close(cond[:, -1], pooled, **close)
        null, null_pooled, _ = pipe.encode_prompt([""], None, device="cpu")
        torch.testing.assert_close(t.score.null_cond, torch.cat([null, null_pooled[:, None]], dim=1), **close)
        return
    if family == "sana":
        embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPTS, device="cpu",
                                                         complex_human_instruction=sana_instruction())
        assert cond.shape == (2, 300, 33) and t.text.null == "empty"
        torch.testing.assert_close(cond[..., :-1], embeds, **EXACT)
        torch.testing.assert_close(cond[..., -1], mask.float(), **EXACT)
        torch.testing.assert_close(t.score.null_cond[..., :-1], neg[:1], **EXACT)  # "" without the instruction
        torch.testing.assert_close(t.score.null_cond[..., -1], neg_mask[:1].float(), **EXACT)
        return
    if family in ("sd", "sd2"):
        embeds, neg = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=True)
        assert cond.shape == (2, 77, 32) and t.text.null == "empty"
        torch.testing.assert_close(cond, embeds, **EXACT)
        torch.testing.assert_close(t.score.null_cond, neg[:1], **EXACT)
        return
    pooled_width = 16 if family == "sdxl" else 32
    tokens, pooled = unpack_pooled(cond, pooled_width)
    kw = dict(prompt_2=None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    if family == "sdxl":
        embeds, neg, pooled_ref, neg_pooled = pipe.encode_prompt(PROMPTS, **kw)
        assert cond.shape == (2, 78, 64) and t.text.null == "zeros"  # SDXL's force_zeros_for_empty_prompt
    else:
        embeds, neg, pooled_ref, neg_pooled = pipe.encode_prompt(PROMPTS, prompt_3=None, **kw)
        assert cond.shape == (2, 77 + 256 + 1, 96) and t.text.null == "empty"
        assert (tokens[:, :77, 64:] == 0).all()  # the CLIP states zero-padded to the joint width
        if family == "sd3-no-t5":
            assert (tokens[:, 77:] == 0).all()
    # T5 on other batch compositions (the teacher encodes and caches prompts in its own batches): float rounding
    t5 = dict(rtol=0, atol=2e-5) if family == "sd3" else EXACT
    torch.testing.assert_close(tokens, embeds, **t5)
    torch.testing.assert_close(pooled, pooled_ref, **EXACT)
    assert (cond[:, -1, pooled_width:] == 0).all()
    null_tokens, null_pooled = unpack_pooled(t.score.null_cond, pooled_width)
    torch.testing.assert_close(null_tokens, neg[:1], **t5)
    torch.testing.assert_close(null_pooled, neg_pooled[:1], **EXACT)


def test_the_network_gets_the_pipelines_inputs(family_teacher):
    """The canonical prediction equals the network called as the pipeline calls it (SD 1.x/2.x: text states at the
    integer timestep; SDXL: added text_embeds and
    time_ids from _get_add_time_ids; SD3: pooled_projections and timestep = 1000 sigma, velocity output)."""
    family, t = family_teacher
    pipe = pipeline_of(t)
    x = torch.randn(2, *t.shape)
    cond = t.text(PROMPTS)
    with torch.no_grad():
        if family == "flux":  # the pipeline packs 2x2 patches and passes time in [0, 1] and guidance 3.5
            embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")
            packed = pipe._pack_latents(x, 2, 4, 8, 8)
            v = pipe.transformer(packed, timestep=torch.full((2,), 0.7), guidance=torch.full((2,), 3.5),
                                 pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                 img_ids=pipe._prepare_latent_image_ids(2, 4, 4, "cpu", x.dtype)).sample
            v = pipe._unpack_latents(v, 16, 16, pipe.vae_scale_factor)
            torch.testing.assert_close(t.score(x, torch.full((2,), 0.7), cond).x0, x - 0.7 * v, rtol=1e-4, atol=1e-4)
        elif family == "sana":
            embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                                    complex_human_instruction=sana_instruction())
            v = pipe.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                 timestep=torch.full((2,), 700.0)).sample
            x0 = t.score(x, torch.full((2,), 0.7), cond).x0
            torch.testing.assert_close(x0, x - 0.7 * v, rtol=1e-4, atol=1e-4)
        elif family in ("sd", "sd2"):
            embeds, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
            eps = pipe.unet(x, 500, encoder_hidden_states=embeds).sample
            torch.testing.assert_close(t.score(x, torch.full((2,), 500 / 999), cond).eps, eps, rtol=1e-4, atol=1e-4)
        elif family == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
            size = (16, 16)
            time_ids = pipe._get_add_time_ids(size, (0, 0), size, embeds.dtype,
                                              text_encoder_projection_dim=16).repeat(2, 1)
            eps = pipe.unet(x, 500, encoder_hidden_states=embeds,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            torch.testing.assert_close(t.score(x, torch.full((2,), 500 / 999), cond).eps, eps, rtol=1e-4, atol=1e-4)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                      do_classifier_free_guidance=False)
            sigma = 0.7
            v = pipe.transformer(x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                 timestep=torch.full((2,), 1000 * sigma)).sample
            x0 = t.score(x, torch.full((2,), sigma), cond).x0
            torch.testing.assert_close(x0, x - sigma * v, rtol=1e-4, atol=1e-4)
    images = t.decode(torch.randn(2, *t.shape))
    assert images.shape == (2, 3, 2 * t.shape[1], 2 * t.shape[2])
