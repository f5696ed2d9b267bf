"""Bad input to vocabulary-parallel calls (run by vocab_parallel_worker.py on every rank): each must raise the
expected error on EVERY rank (a rank that went on would wait forever in a collective)."""
import math

import torch
import torch.distributed as dist

from vocab_parallel_worker import K, V, fused_inputs, logits_inputs


def expect(exc_type, prefix, fn):
    try:
        fn()
    except exc_type as e:
        if not str(e).startswith(prefix):
            raise AssertionError(f"message {str(e)!r} does not start with {prefix!r}") from e
        return
    raise AssertionError(f"no {exc_type.__name__} ({prefix!r})")


def bad_cases(env):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from fastdistill import distill_loss, fused_linear_distill_loss, topk_distill_loss

    z, y, labels = logits_inputs(4, nan=False, masked=False)
    lp, ids = torch.log_softmax(y, -1).topk(K, -1)
    sh, sw, sb, th, tw, tb, flabels = fused_inputs(5)
    rank, world = env.rank, env.world
    subgroup = dist.new_group([0])  # every rank takes part in creating it; only rank 0 is a member
    mesh_2d = init_device_mesh("cpu", (world, 1))
    group = {"group": env.group}

    def misaligned_slices():
        # the student split 700 + 571, the teacher 636 + 635: the totals agree, the slices do not
        distill_loss(env.shard("group", z, -1), env.shard("dtensor", y, -1).to_local(), labels=labels, **group)

    def wrong_global_vocab():
        local = env.shard("dtensor", z, -1).to_local()
        student = DTensor.from_local(local, env.mesh, [Shard(2)], shape=torch.Size((2, 5, V + 1)),
                                     stride=(5 * (V + 1), V + 1, 1))
        distill_loss(student, env.shard("dtensor", y, -1), labels=labels)

    def not_a_member_or_other_ranks():
        distill_loss(env.shard("dtensor", z, -1), env.shard("dtensor", y, -1), labels=labels, group=subgroup)

    def shard_on_rows():
        distill_loss(distribute_tensor(z, env.mesh, [Shard(0)]), distribute_tensor(y, env.mesh, [Shard(0)]))

    def replicated_logits():
        distill_loss(distribute_tensor(z, env.mesh, [Replicate()]), distribute_tensor(y, env.mesh, [Replicate()]))

    def mixed():
        distill_loss(env.shard("dtensor", z, -1), y[..., env.slice_of("dtensor")].clone(), labels=labels)

    def two_d_mesh():
        placements = [Shard(2), Replicate()]
        distill_loss(distribute_tensor(z, mesh_2d, placements), distribute_tensor(y, mesh_2d, placements))

    def label_out_of_range():
        bad = labels.clone()
        bad[1, 1] = V  # valid on no rank: only the whole vocabulary's V tells
        distill_loss(env.shard("group", z, -1), env.shard("group", y, -1), labels=bad, hard_weight=0.5, **group)

    def not_a_group():
        distill_loss(env.shard("group", z, -1), env.shard("group", y, -1), group="world")

    def kernel_backend():
        distill_loss(env.shard("group", z, -1), env.shard("group", y, -1), backend="cpu", **group)

    def topk_id_out_of_range():
        bad = ids.clone()
        bad[0, 1, 2] = V
        topk_distill_loss(env.shard("group", z, -1), lp, bad, validate=True, **group)

    def topk_k_above_vocab():
        small = z[..., 15 * rank:15 * (rank + 1)].clone()  # V = 30 over the 2 ranks
        topk_distill_loss(small, torch.full((2, 5, 31), -math.log(31.0)), torch.arange(31).expand(2, 5, 31), **group)

    def labels_differ():  # e.g. data-parallel ranks: different tokens on each rank
        mine = labels.clone()
        mine[0, 1] = rank
        distill_loss(env.shard("group", z, -1), env.shard("group", y, -1), labels=mine, **group)

    def fsdp_like_head():  # a head sharded over ranks that see different tokens (FSDP2 outside forward)
        fused_linear_distill_loss(sh, env.shard("dtensor", sw, 0), th, env.shard("dtensor", tw, 0),
                                  labels=flabels + rank)

    def fsdp_like_head_no_labels():
        fused_linear_distill_loss(sh + rank, env.shard("dtensor", sw, 0), th, env.shard("dtensor", tw, 0))

    def rows_differ():
        rows = 5 if rank == 0 else 4
        distill_loss(env.shard("group", z, -1)[:, :rows], env.shard("group", y, -1)[:, :rows], **group)

    def empty_slice():  # V = 1 over 2 ranks
        distill_loss(z[..., rank:1].clone(), y[..., rank:1].clone(), **group)

    def topk_sharded_ids():
        topk_distill_loss(env.shard("dtensor", z, -1), lp, distribute_tensor(ids, env.mesh, [Shard(0)]))

    def fused_weight_on_hidden_dim():
        fused_linear_distill_loss(sh, distribute_tensor(sw, env.mesh, [Shard(1)]), th,
                                  distribute_tensor(tw, env.mesh, [Shard(0)]), labels=flabels)

    def fused_teacher_misaligned():
        fused_linear_distill_loss(sh, env.shard("group", sw, 0), th, env.shard("dtensor", tw, 0).to_local(),
                                  labels=flabels, **group)

    def fused_bias_plain():
        fused_linear_distill_loss(sh, env.shard("dtensor", sw, 0), th, env.shard("dtensor", tw, 0),
                                  student_bias=sb[env.slice_of("dtensor")].clone(), labels=flabels)

    def fused_teacher_plain_hidden_dtensor():
        fused_linear_distill_loss(env.replicate(sh), env.shard("group", sw, 0), th, env.shard("group", tw, 0),
                                  **group)

    return {
        "bad/misaligned_slices": lambda: expect(ValueError, "teacher_logits: rank 0 holds 636 vocabulary entries "
                                                "but student_logits holds 700", misaligned_slices),
        "bad/wrong_global_vocab": lambda: expect(ValueError, f"student_logits: its local shards add up to V = {V}",
                                                 wrong_global_vocab),
        "bad/group_not_the_mesh": lambda: expect(ValueError, "group: holds ranks [0], but student_logits's device "
                                                 "mesh holds ranks [0, 1]" if rank == 0 else
                                                 "group: this rank is not a member", not_a_member_or_other_ranks),
        "bad/shard_on_rows": lambda: expect(ValueError, "student_logits: expected placement Shard(-1)", shard_on_rows),
        "bad/replicated_logits": lambda: expect(ValueError, "student_logits: expected placement Shard(-1)",
                                                replicated_logits),
        "bad/mixed": lambda: expect(TypeError, "teacher_logits: a plain tensor, but student_logits is a DTensor",
                                    mixed),
        "bad/two_d_mesh": lambda: expect(ValueError, "student_logits: a DTensor on a 2-D device mesh", two_d_mesh),
        "bad/label_out_of_range": lambda: expect(ValueError, f"labels: value {V} at row 6", label_out_of_range),
        "bad/not_a_group": lambda: expect(TypeError, "group: expected a torch.distributed.ProcessGroup", not_a_group),
        "bad/kernel_backend": lambda: expect(ValueError, "backend: vocabulary-parallel", kernel_backend),
        "bad/topk_id_out_of_range": lambda: expect(ValueError, f"teacher_topk_indices: id {V} in row 1",
                                                   topk_id_out_of_range),
        "bad/topk_k_above_vocab": lambda: expect(ValueError, "teacher_topk_logprobs: k = 31 top-k entries per row, "
                                                 "but the vocabulary has V = 30", topk_k_above_vocab),
        "bad/topk_sharded_ids": lambda: expect(ValueError, "teacher_topk_indices: expected a replicated DTensor",
                                               topk_sharded_ids),
        "bad/fused_weight_on_hidden_dim": lambda: expect(ValueError, "student_weight: expected placement Shard(0)",
                                                         fused_weight_on_hidden_dim),
        "bad/fused_teacher_misaligned": lambda: expect(ValueError, "teacher_weight: rank 0 holds 636 vocabulary "
                                                       "entries but student_weight holds 700",
                                                       fused_teacher_misaligned),
        "bad/fused_bias_plain": lambda: expect(TypeError, "student_bias: a plain tensor, but student_weight is a "
                                               "DTensor", fused_bias_plain),
        "bad/fused_hidden_dtensor_with_slices": lambda: expect(TypeError, "student_hidden: a DTensor, but the "
                                                               "vocabulary-sharded tensors are plain local slices",
                                                               fused_teacher_plain_hidden_dtensor),
        "bad/labels_differ": lambda: expect(ValueError, "labels: its values differ between rank 0 and rank 1",
                                            labels_differ),
        "bad/fsdp_like_head": lambda: expect(ValueError, "labels: its values differ between rank 0 and rank 1",
                                             fsdp_like_head),
        "bad/fsdp_like_head_no_labels": lambda: expect(ValueError, "student_hidden: its values differ (sum |x|) "
                                                       "between rank 0 and rank 1", fsdp_like_head_no_labels),
        "bad/rows_differ": lambda: expect(ValueError, "student_logits: its size differs between rank 0 and rank 1",
                                          rows_differ),
        "bad/empty_slice": lambda: expect(ValueError, "student_logits: rank 1 holds no vocabulary entries",
                                          empty_slice),
    }
