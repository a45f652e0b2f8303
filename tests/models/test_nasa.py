"""NASA (SNOOPI's negative-prompt attention) on diffusers cross-attention, built from config."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stepdistill.models.nasa import NASAProcessor, negative_prompt_attention


def test_processor_subtracts_the_scaled_negative_attention_before_the_output_projection():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    x, pos, neg = torch.randn(3, 5, 16), torch.randn(3, 4, 8), torch.randn(1, 6, 8)

    def attend(ctx):
        q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = (t.view(3, -1, 2, 8).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(3, -1, 16)

    expected = attn.to_out[0](attend(pos) - 0.7 * attend(neg.expand(3, -1, -1)))
    out = NASAProcessor(neg, 0.7, AttnProcessor2_0())(attn, x, encoder_hidden_states=pos)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unet_context_changes_cross_attention_only_while_active():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    x, t, pos, neg = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=pos).sample
        with negative_prompt_attention(unet, neg, 0.0):
            zero = unet(x, t, encoder_hidden_states=pos).sample
        with negative_prompt_attention(unet, neg, 0.5):
            guided = unet(x, t, encoder_hidden_states=pos).sample
        after = unet(x, t, encoder_hidden_states=pos).sample
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=1e-5)
    assert (guided - plain).abs().max() > 1e-3
    assert torch.equal(after, plain)


def test_bad_negative_embeddings_are_rejected():
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(ValueError, match="tokens, channels"):
        with negative_prompt_attention(unet, torch.randn(3, 8), 0.5):
            pass
