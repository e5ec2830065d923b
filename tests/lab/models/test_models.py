"""One loader for LLaMA-style models: local folders (and hub ids, which users have)."""

from conftest import tiny_llama
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from corda_vl.lab.models import load_llama


def test_load_llama_from_a_local_folder(tmp_path):
    vocab = {"<unk>": 0, "the": 1, "capital": 2, "of": 3, "france": 4, "</s>": 5}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_llama(str(tmp_path))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert loaded_tok.pad_token == "</s>"  # padding needs a pad token; eos stands in
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.equal(b), name
    assert loaded_tok("the capital of france")["input_ids"] == [1, 2, 3, 4]
