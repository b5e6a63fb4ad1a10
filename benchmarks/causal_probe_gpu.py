"""GPU probe (one call): do later tokens change earlier logits? For SDPA with enable_gqa and
is_causal under bf16 autocast, our Llama, and a transformers Llama through parallelize."""
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from dtensor_parallel import ParallelPlan, build_mesh, parallelize
from dtensor_parallel.models import Llama, ModelArgs

torch.cuda.set_device(0)
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())
for s in (16, 2048, 8192):
    q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, s // 2:] += 1
    v2[:, :, s // 2:] += 1
    out2 = F.scaled_dot_product_attention(q, k2, v2, is_causal=True, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    print(f"sdpa s={s}: leak {(out - out2)[:, :, :s // 2].abs().max().item():.3g} vs repeated "
          f"{(out - ref).abs().max().item():.3g}")
args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64,
                 ffn_dim_multiplier=None, rope_theta=10000.0, rope_scaling_factor=None, max_seq_len=4096)
cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
torch.manual_seed(0)
models = {"ours": Llama(args).cuda(), "hf": transformers.LlamaForCausalLM(cfg).cuda()}
models["ours"].init_weights(buffer_device="cuda")
x = torch.randint(0, 512, (1, 2048), device="cuda")
x2 = x.clone()
x2[0, 1024:] = (x2[0, 1024:] + 1) % 512
for name, m in models.items():
    ref = copy.deepcopy(m)
    pm = parallelize(m, build_mesh(), ParallelPlan(mixed_precision="bf16"))
    with torch.no_grad():
        a, b = pm(x), pm(x2)
        leak = (a[0, :1024] - b[0, :1024]).abs().max().item()
        r = ref(x).logits if name == "hf" else ref(x)
        print(f"{name}: leak {leak:.3g}, |bf16 - fp32 ref| {(a.float() - r.float()).abs().max().item():.3g}, "
              f"attn {getattr(getattr(m, 'config', None), '_attn_implementation', '-')}")
    # training on one fixed random batch, as the benchmark does
    opt = torch.optim.AdamW(pm.parameters(), lr=8e-4)
    y = torch.randint(0, 512, (1, 2048), device="cuda")
    losses = []
    for _ in range(13):
        losses.append(pm.forward_backward(x, y).item())
        opt.step(); pm.zero_grad()
    print(name, "memorize a fixed random batch:", [round(v, 2) for v in losses[::4]])
