import torch

from eagle3.config import Eagle3Qwen3Config
from eagle3.modeling import Eagle3Qwen3ForCausalLM
from eagle3.vocab import count_tokens, coverage, d2t_t2d, select_draft_vocab


def test_counts_only_loss_masked_tokens():
    ids = torch.tensor([5, 5, 7, 9, 9, 9])
    mask = torch.tensor([0, 1, 1, 0, 1, 1], dtype=torch.bool)
    counts = count_tokens([(ids, mask)], vocab_size=12)
    assert counts[5] == 1 and counts[7] == 1 and counts[9] == 2 and counts.sum() == 4


def test_top_n_sorted_ascending_with_lower_id_winning_ties():
    counts = torch.zeros(20, dtype=torch.long)
    counts[[15, 3, 8, 11]] = torch.tensor([9, 5, 5, 1])
    assert select_draft_vocab(counts, 3).tolist() == [3, 8, 15]


def test_fill_with_lowest_unused_ids_when_too_few_distinct_tokens():
    counts = torch.zeros(20, dtype=torch.long)
    counts[[2, 17]] = 4
    ids = select_draft_vocab(counts, 5)
    assert ids.tolist() == [0, 1, 2, 3, 17]
    assert ids.unique().numel() == 5


def test_capped_at_target_vocab_and_full_vocab_is_identity_without_d2t():
    counts = torch.ones(16, dtype=torch.long)
    assert select_draft_vocab(counts, 32000).tolist() == list(range(16))
    config = Eagle3Qwen3Config(
        hidden_size=64,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=96,
        vocab_size=16,
        draft_vocab_size=16,
        target_layers=[0, 1, 2],
        num_hidden_layers=1,
    )
    assert Eagle3Qwen3ForCausalLM(config).d2t is None  # vLLM rejects d2t when the vocab is not reduced


def test_d2t_t2d_and_coverage():
    ids = torch.tensor([1, 4, 6])
    d2t, t2d = d2t_t2d(ids, 8)
    assert (torch.arange(3) + d2t).tolist() == [1, 4, 6]
    assert t2d.nonzero().flatten().tolist() == [1, 4, 6]
    counts = torch.tensor([0, 3, 0, 0, 1, 0, 0, 4])
    assert abs(coverage(counts, ids) - 0.5) < 1e-9
