"""examples/distill_hf_causal_lm.py in small settings: the byte-level run (teacher trained on the stdlib
sources, then distilled) and the --teacher/--student/--tokenizer path for local checkpoints."""
import math
import os
import sys

import pytest

pytest.importorskip("transformers")

from hf.tiny_models import tiny_llama  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "examples"))

import distill_hf_causal_lm  # noqa: E402

SMALL = ["--teacher-steps", "30", "--steps", "20", "--seq", "32", "--batch", "8", "--teacher-hidden", "32",
         "--student-hidden", "16", "--teacher-layers", "2", "--student-layers", "1", "--eval-windows", "8"]


def test_byte_level_run_trains_a_teacher_and_distills(tmp_path):
    r = distill_hf_causal_lm.main(SMALL + ["--output-dir", str(tmp_path)])
    assert r["teacher_ppl"] < 0.5 * distill_hf_causal_lm.BYTE_VOCAB  # the teacher learned something
    assert r["after"]["kl"] < 0.5 * r["before"]["kl"], r
    assert r["after"]["ppl"] < r["before"]["ppl"], r


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_local_checkpoints(tmp_path):
    teacher_dir, student_dir, tok_dir = (str(tmp_path / d) for d in ("teacher", "student", "tokenizer"))
    tiny_llama(256, seed=0).save_pretrained(teacher_dir)
    tiny_llama(264, seed=1, hidden_size=16).save_pretrained(student_dir)  # padded vocabulary: -inf entries
    _byte_level_tokenizer().save_pretrained(tok_dir)
    r = distill_hf_causal_lm.main(["--teacher", teacher_dir, "--student", student_dir, "--tokenizer", tok_dir,
                                   "--steps", "12", "--seq", "16", "--batch", "4", "--eval-windows", "4",
                                   "--output-dir", str(tmp_path / "out")])
    assert all(math.isfinite(v) for k in ("before", "after") for v in r[k].values())
    assert r["after"]["kl"] < r["before"]["kl"], r


def test_teacher_and_student_go_together():
    with pytest.raises(SystemExit):
        distill_hf_causal_lm.main(["--teacher", "somewhere"])
