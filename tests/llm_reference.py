"""A slow, obvious prefill of a LLaVA-style Llama LM for checking in-LLM strategies independently of vlmeff.

Every layer's attention logits are recomputed by hand (q / k projections, rotary, scaling, causal + padding mask);
after the layers in `prune_after`, `select` (the formula under test, written plainly in the test) returns the visual
tokens each sample keeps, and the sequence is re-built without the others (left padding, original positions).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def embeds_of(model, inputs) -> torch.Tensor:
    captured = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]),
                                          with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return captured["embeds"]


def attention_logits(layer, hidden, positions, allowed, rotary) -> torch.Tensor:
    """[B, H, S, S] scaled logits of one Llama layer's attention, disallowed entries -inf."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary(hidden, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    return logits.masked_fill(~allowed[:, None], float("-inf"))


def reference_prefill(model, inputs, prune_after, select):
    """Returns {first layer without the removed tokens: [kept grid cells per sample]}.

    select(layer, logits [B, H, S, S], samples) -> per sample the kept indices into its visual tokens (ascending),
    where samples[b] = dict(visual=positions [n], text_after=positions, cells=[n], num_visual=V0, last=int,
    valid=[S] bool, hidden=[S, D] the layer's output).
    """
    lm = model.model.language_model
    image_id = model.config.image_token_id
    with torch.no_grad():
        hidden = embeds_of(model, inputs)
        valid = inputs["attention_mask"].bool()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        is_visual = (inputs["input_ids"] == image_id) & valid
        cells = (is_visual.long().cumsum(-1) - 1) * is_visual - (~is_visual).long()  # visual order; -1 for text
        num_visual = is_visual.sum(1).tolist()
        result = {}
        for i, layer in enumerate(lm.layers):
            n = hidden.shape[1]
            allowed = (torch.ones(n, n, dtype=torch.bool).tril()[None] & valid[:, None, :]) | torch.eye(
                n, dtype=torch.bool)[None]
            logits = attention_logits(layer, hidden, positions, allowed, lm.rotary_emb)
            hidden = layer(hidden, attention_mask=allowed[:, None], position_embeddings=lm.rotary_emb(hidden, positions),
                           position_ids=positions)
            if i not in prune_after:
                continue
            samples = []
            for row in range(hidden.shape[0]):
                visual = is_visual[row].nonzero().squeeze(1)
                first = int(visual[0]) if visual.numel() else n
                text = ((~is_visual[row]) & valid[row]).nonzero().squeeze(1)
                samples.append(dict(visual=visual, text_after=text[text > first], cells=cells[row, visual],
                                    num_visual=num_visual[row], last=int(valid[row].nonzero().max()),
                                    valid=valid[row], hidden=hidden[row]))
            chosen = select(i, logits, samples)
            keep = valid.clone()
            for row, (sample, kept) in enumerate(zip(samples, chosen)):
                drop = [j for j in range(sample["visual"].numel()) if j not in set(kept)]
                keep[row, sample["visual"][drop]] = False
            width = int(keep.sum(1).max())
            new = [torch.zeros(hidden.shape[0], width, hidden.shape[2]), torch.zeros(hidden.shape[0], width,
                                                                                     dtype=torch.long)]
            new_valid = torch.zeros(hidden.shape[0], width, dtype=torch.bool)
            new_visual = torch.zeros_like(new_valid)
            new_cells = torch.full((hidden.shape[0], width), -1, dtype=torch.long)
            for row in range(hidden.shape[0]):
                idx = keep[row].nonzero().squeeze(1)
                sl = slice(width - idx.numel(), width)
                new[0][row, sl], new[1][row, sl] = hidden[row, idx], positions[row, idx]
                new_valid[row, sl], new_visual[row, sl], new_cells[row, sl] = True, is_visual[row, idx], cells[row, idx]
            hidden, positions, valid, is_visual, cells = new[0], new[1], new_valid, new_visual, new_cells
            result[i + 1] = [cells[row][is_visual[row]].tolist() for row in range(hidden.shape[0])]
    return result
