"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=0)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, tie: bool = True):
    """GPT-2's layout: transformers Conv1D projections (weights stored transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)).eval()


def text_batches(n_batches: int = 3, batch_size: int = 4, length: int = 20, seed: int = 1, pad: bool = True):
    """Random token batches; with ``pad`` some rows end in right padding (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, length), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            for row in range(1, batch_size, 2):
                cut = int(torch.randint(length // 3, length, (1,), generator=g))
                ids[row, cut:] = 0
                mask[row, cut:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def batches():
    return text_batches()


def tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        projection_dim=24)
    return CLIPModel(config).eval()


def clip_batches(n: int = 3, seed: int = 2):
    """Alternating image batches and padded text batches (8 examples each)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        out.append({"pixel_values": torch.randn(8, 3, 16, 16, generator=g)})
        ids = torch.randint(3, VOCAB, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[::2, 8:] = 0
        ids[::2, 8:] = 0
        ids[:, 0] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


IMAGE_TOKEN = VOCAB - 1
PATCHES = 16  # 16x16 images, patch 4, class token dropped


def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=4)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).eval()


def llava_batches(n: int = 3, seed: int = 4):
    """Multimodal batches (2 images, each announced by 16 image tokens, right padding) and one text-only batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, IMAGE_TOKEN, (2, 28), generator=g)
        ids[:, 2:2 + PATCHES] = IMAGE_TOKEN
        mask = torch.ones_like(ids)
        mask[1, 24:] = 0
        ids[1, 24:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)})
    ids = torch.randint(1, IMAGE_TOKEN, (2, 10), generator=g)
    out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def tiny_open_clip(seed: int = 0):
    """A real open_clip CLIP (ViT towers, nn.MultiheadAttention) small enough for tests; its text
    tower takes open_clip's own tokenizer (vocabulary 49408, context 77)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=32, head_width=8, image_size=16, patch_size=4)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2)
    return CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


def open_clip_batches(n: int = 2, seed: int = 6):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    g = torch.Generator().manual_seed(seed)
    captions = ["a photo of a cat", "a drawing of a red square", "two dogs", "a digit seven",
                "a blue circle on white", "the capital of france", "a small green triangle", "noise"]
    out = []
    for i in range(n):
        out.append({"image": torch.randn(8, 3, 16, 16, generator=g)})
        out.append({"text": tokenizer(captions[i:] + captions[:i])})
    return out


def module_inputs(model, name, run, batches):
    """The inputs module ``name`` receives while ``run(model, batch)`` goes over ``batches``
    (one entry per batch that reached it), captured by a hook the test installs itself."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        for batch in batches:
            with torch.no_grad():
                run(model, batch)
    finally:
        handle.remove()
    return seen


WORDS = ["question", "answer", ":", "?", ".", ",", "what", "is", "the", "capital", "of", "a", "an", "photo",
         "shape", "color", "circle", "rectangle", "triangle", "red", "green", "blue", "yellow", "gray", "black",
         "france", "paris", "germany", "berlin", "japan", "tokyo", "italy", "rome", "spain", "madrid", "digit",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "in", "image", "there",
         "yes", "no", "does", "contain", "country", "its", "people", "are", "called", "water", "boils", "at"]
WORDS += [f"w{i}" for i in range(VOCAB - 5 - len(WORDS))]


def assert_image_text_split(model, store, name, batches, image_token, images_expected):
    """A VLM language layer's covariances: the image-token one equals the products of the inputs at
    the image token's positions, and image + text add up to all tokens."""
    seen = module_inputs(model, name, lambda m, b: m(**b), batches)
    images = torch.cat([x[b["input_ids"] == image_token] for x, b in zip(seen, batches)])
    assert store.count(name, "calib/image") == images.shape[0] == images_expected
    torch.testing.assert_close(store.sum(name, "calib/image"), images.T @ images, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(store.sum(name, "calib/image") + store.sum(name, "calib/text"), store.sum(name, "calib"))


def assert_exact_at_init_and_stock_reload(model, store, config, batch, folder):
    """Build ``config`` on ``model``: the dry run names the adapted modules, the outputs at init are
    the base model's, and stock PEFT reloads the saved adapter onto the saved residual with the
    same outputs. Returns the adapted module names."""
    from peft import PeftModel

    from corda_vl import build_corda, plan, save_corda

    def vlm_logits(m):
        with torch.no_grad():
            return m(**batch).logits

    reference = vlm_logits(model)
    dry = plan(model, config, store)
    built = build_corda(model, store, config, progress=False)
    adapted = sorted(n for n, m in built.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert sorted(dry.modules) == adapted
    torch.testing.assert_close(vlm_logits(built), reference, atol=5e-5, rtol=0)
    out = save_corda(built, folder)
    stock = PeftModel.from_pretrained(type(model).from_pretrained(out / "residual"), out / "adapter")
    torch.testing.assert_close(vlm_logits(stock), reference, atol=5e-5, rtol=0)
    return adapted


def tiny_tokenizer(image_token: bool = True):
    """A word-level fast tokenizer over VOCAB ids (no files, no downloads): <pad> 0, <unk> 1,
    <s> 2 (prepended), </s> 3, the words above, and <image> = IMAGE_TOKEN (VOCAB - 1), or a plain
    word there when ``image_token`` is False (a text-only LM's tokenizer)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)},
             "<image>" if image_token else "w_last": VOCAB - 1}
    assert len(vocab) == VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<image>"] if image_token else None)
