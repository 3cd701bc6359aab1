"""Healing: fine-tune a grown or pruned model with optax towards the model it came from, judged on text it
did not train on.

The student is a model plus a depth plan (`layer_ids`, per-slot scales). Its loss on a batch of token
windows (B, T) is

    L = a * CE(student) + w * KL(teacher || student)

averaged over the positions 0..T-2 (predicting tokens 1..T-1), with the teacher frozen. With a teacher the
default is a = 0, w = 1: healing pursues the teacher's function (an LM term on the training text pulls the
student towards that text instead, away from the teacher; experiments/healing measures it). Without a
teacher, a = 1 (language modelling). The (B, T, V) logits are never formed: the head is applied and reduced
a chunk of positions at a time (`expand.numerics.chunked_token_terms`), and with remat each layer's
activations are recomputed in the backward pass.

Judgement: the last windows (HealOptions.held_out) or separate evaluation windows are held out; KL to the
teacher, top-1 agreement and LM loss on them are measured before step 1, every eval_every steps and after
the last; keep="best" returns the weights of the evaluation with the lowest held-out KL (step 0, the
student as it was, included), keep="last" the last step's.

Options (`HealOptions`):
- shared = "virtual": slots that run the same stored layer share its weights. The gradient of a layer
  shared by k slots is the sum of k slot gradients, so its update is divided by k (lr/k), applied after
  Adam (which would otherwise undo a gradient scale). shared = "decoupled": the plan is materialized
  first and every slot owns its weights.
- train = "all" | "new" | "slots:SPEC": which slots' layer weights train; with anything but "all" the
  embeddings, final norm and lm_head are frozen (LLaMA-Pro trains only the new blocks). "new" = the slots
  whose stored layer already ran in an earlier slot (duplicates and identity copies). Freezing is exact:
  frozen tensors and frozen layers are bitwise unchanged.
- gates: a scalar gate g_s per new slot multiplies its o_proj and down_proj (the residual branches), in
  place of the plan's identity scales; g_s = 0 at init is an exact identity. `export` folds the gates
  into the weights, so the result is a plain Llama checkpoint.
- AdamW, gradient clipping at global norm `clip`; the learning rate ramps up linearly over `warmup` steps
  and then holds (or decays on a cosine over its own horizon, decay_steps): it never depends on `steps`.

Batches are drawn from the training windows in the order of a permutation drawn from `seed` (step s uses
positions s*B .. s*B+B-1 of it, wrapping), so the data is a function of the step. An orbax
CheckpointManager saves params, optimizer state, the kept-best weights and the logs every
`checkpoint_every` steps and after the last; `resume` restarts from the latest one, also to extend a
finished run to more steps, and follows the same trajectory as an uninterrupted run. Non-finite weights
are refused before step 1 (naming the tensor); a loss or weights turning non-finite later stop the run with
`HealDiverged`, keeping the last checkpoint (always from a finite step).

Modules: options (HealOptions), student (the plan, gates, freezing, export), optimizer (schedule, AdamW,
lr/k), loss (chunked loss, the step, held-out evaluation), data (held-out split, batch order), run (the
loop, checkpoints, resume), result (HealResult, history.json, loss.png, the atomic output directory).
"""

from expand.heal.options import HealDiverged, HealOptions
from expand.heal.result import HealResult
from expand.heal.run import heal
from expand.heal.student import GATES, Student, export, make_student

__all__ = ["GATES", "HealDiverged", "HealOptions", "HealResult", "Student", "export", "heal", "make_student"]
