"""The PyTorch side of `research.bench`: the same models and steps, timed.

Runs in its own interpreter (it needs only torch and numpy), so that JAX and
PyTorch never share a process. Reads one JSON job from argv, prints one JSON
record per line.
"""
import functools
import json
import statistics
import sys
import time

import torch
from torch import nn


class LeNet(nn.Module):
    """research.models.cnn.LeNet: conv 6@5x5, pool, conv 16@5x5, pool, 120, 84."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1, self.fc2 = nn.Linear(400, 120), nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CharLSTM(nn.Module):
    """research.models.rnn.CharRNN(cell="lstm") with nn.LSTM."""

    def __init__(self, vocab, embed, hidden, layers, dropout):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, dropout=dropout if layers > 1 else 0,
                            batch_first=True)
        self.drop, self.head = nn.Dropout(dropout), nn.Linear(hidden, vocab)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(self.drop(out))


class GPT(nn.Module):
    """research.models.gpt.GPT: pre-norm blocks, causal attention through
    `scaled_dot_product_attention`, a GELU MLP, tied embeddings, no biases
    but the LayerNorms'; the embedding's rows padded as there."""

    def __init__(self, vocab, rows, layers, width, heads, context, mlp_ratio,
                 dropout):
        super().__init__()
        self.vocab, self.heads = vocab, heads
        self.embed = nn.Embedding(rows, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.01)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, dropout)
                                    for _ in range(layers))
        self.norm, self.drop = nn.LayerNorm(width), nn.Dropout(dropout)

    def forward(self, tokens):
        x = self.drop(self.embed(tokens) + self.position[:tokens.shape[1]])
        for block in self.blocks:
            x = block(x)
        return (self.norm(x) @ self.embed.weight.T)[..., :self.vocab]


class _Block(nn.Module):
    def __init__(self, width, heads, mlp_ratio, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.fc1 = nn.Linear(width, mlp_ratio * width, bias=False)
        self.fc2 = nn.Linear(mlp_ratio * width, width, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = (y.view(b, t, self.heads, w // self.heads).transpose(1, 2)
                   for y in self.qkv(self.norm1(x)).split(w, dim=2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.out(y.transpose(1, 2).reshape(b, t, w)))
        h = self.fc2(nn.functional.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        return x + self.drop(h)


class _Norm(nn.BatchNorm2d):
    """airbench's BatchNorm: no scale (frozen at 1), momentum 0.4 (PyTorch's
    convention for flax's 0.6), eps 1e-12."""

    def __init__(self, channels):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad = False


class _Group(nn.Module):
    def __init__(self, channels_in, channels_out):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding="same", bias=False)
        self.norm1, self.norm2 = _Norm(channels_out), _Norm(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding="same",
                               bias=False)
        self.pool, self.act = nn.MaxPool2d(2), nn.GELU()

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
    """research.models.airbench.AirbenchNet: airbench94's network."""

    def __init__(self, widths, num_classes=10):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        layers, width = [], 24
        for out in widths:
            layers.append(_Group(width, out))
            width = out
        self.groups = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes, bias=False)

    def forward(self, x):
        x = self.groups(nn.functional.gelu(self.whiten(x)))
        x = nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) / 9


def _flip_translate(images, pad):
    """airbench's augmentation of a batch: random flips and translations by
    up to `pad` pixels (reflect padding), as the JAX step does on device."""
    flip = torch.rand(len(images)) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if not pad:
        return images
    padded = nn.functional.pad(images, (pad,) * 4, mode="reflect")
    shifts = torch.randint(0, 2 * pad + 1, (len(images), 2))
    out = torch.empty_like(images)
    size = images.shape[-1]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            mask = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[mask] = padded[mask, :, dy:dy + size, dx:dx + size]
    return out


def _airbench_step(job):
    """The fast CNN's train step the strongest way PyTorch offers on this
    CPU: bf16 autocast and channels-last, Nesterov SGD with airbench's two
    parameter groups and weight decay, label smoothing."""
    batch = job["batch_size"]
    model = Airbench(job["widths"]).to(memory_format=torch.channels_last)
    lr, wd = job["learning_rate"] / batch, job["weight_decay"]  # per summed loss
    norm = [p for n, p in model.named_parameters() if "norm" in n and p.requires_grad]
    other = [p for n, p in model.named_parameters()
             if "norm" not in n and p.requires_grad]
    opt = torch.optim.SGD(
        [{"params": norm, "lr": 64 * lr, "weight_decay": wd / (64 * lr)},
         {"params": other, "lr": lr, "weight_decay": wd / lr}],
        momentum=job["momentum"], nesterov=True)
    images = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=job["label_smoothing"],
                                  reduction="sum")

    def train_step():
        x = _flip_translate(images, job["translate"]).contiguous(
            memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_step():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)

    return model, train_step, eval_step


def _time(fn, steps: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def run(job: dict) -> dict:
    torch.manual_seed(0)
    batch, steps, repeats = job["batch_size"], job["steps"], job["repeats"]
    if job["model"] == "airbench":
        model, train_step, eval_step = _airbench_step(job)
        model.train()
        train_time = _time(train_step, steps, repeats)
        model.eval()
        eval_time = _time(eval_step, steps, repeats)
        return {"framework": "torch", "torch_version": torch.__version__,
                "threads": torch.get_num_threads(),
                "train_per_sec": batch / train_time, "eval_per_sec": batch / eval_time,
                "step_ms": 1e3 * train_time}
    if job["model"] == "lenet":
        model = LeNet()
        x = torch.rand(batch, 3, 32, 32)
        y = torch.randint(0, 10, (batch,))
        opt = torch.optim.SGD(model.parameters(), lr=job["learning_rate"],
                              momentum=job["momentum"])
        per_example = 1
    else:
        if job["model"] == "gpt":
            model = GPT(job["vocab_size"], job["rows"], job["num_layers"],
                        job["width"], job["num_heads"], job["context"],
                        job["mlp_ratio"], job["dropout_rate"])
        else:
            model = CharLSTM(job["vocab_size"], job["embed_dim"], job["hidden_size"],
                             job["num_layers"], job["dropout_rate"])
        tokens = torch.randint(0, job["vocab_size"], (batch, job["seq_len"] + 1))
        x, y = tokens[:, :-1], tokens[:, 1:]
        opt = torch.optim.Adam(model.parameters(), lr=job["learning_rate"])
        per_example = job["seq_len"]
        if job.get("compile"):  # torch.compile, where it runs on this CPU
            model = torch.compile(model)
    loss_fn = nn.CrossEntropyLoss()
    # bf16 compute on float32 weights, as the JAX model's dtype="bfloat16".
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16,
                                 enabled=job.get("dtype") == "bfloat16")

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
        loss = loss_fn(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if job.get("grad_clip_norm"):
            nn.utils.clip_grad_norm_(model.parameters(), job["grad_clip_norm"])
        opt.step()

    def eval_step():
        with torch.no_grad(), autocast():
            model(x)

    model.train()
    train_time = _time(train_step, steps, repeats)
    model.eval()
    eval_time = _time(eval_step, steps, repeats)
    return {"framework": "torch.compile" if job.get("compile") else "torch",
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "train_per_sec": batch * per_example / train_time,
            "eval_per_sec": batch * per_example / eval_time,
            "step_ms": 1e3 * train_time}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
