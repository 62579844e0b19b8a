"""The PyTorch side of `research.bench`: the same models and steps, timed.

Runs in its own interpreter (it needs only torch and numpy), so that JAX and
PyTorch never share a process. Reads one JSON job from argv, prints one JSON
record per line.
"""
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
    if job["model"] == "lenet":
        model = LeNet()
        x = torch.rand(batch, 3, 32, 32)
        y = torch.randint(0, 10, (batch,))
        opt = torch.optim.SGD(model.parameters(), lr=job["learning_rate"],
                              momentum=job["momentum"])
        per_example = 1
    else:
        model = CharLSTM(job["vocab_size"], job["embed_dim"], job["hidden_size"],
                         job["num_layers"], job["dropout_rate"])
        tokens = torch.randint(0, job["vocab_size"], (batch, job["seq_len"] + 1))
        x, y = tokens[:, :-1], tokens[:, 1:]
        opt = torch.optim.Adam(model.parameters(), lr=job["learning_rate"])
        per_example = job["seq_len"]
    loss_fn = nn.CrossEntropyLoss()

    def train_step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        if job.get("grad_clip_norm"):
            nn.utils.clip_grad_norm_(model.parameters(), job["grad_clip_norm"])
        opt.step()

    def eval_step():
        with torch.no_grad():
            model(x)

    model.train()
    train_time = _time(train_step, steps, repeats)
    model.eval()
    eval_time = _time(eval_step, steps, repeats)
    return {"framework": "torch", "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "train_per_sec": batch * per_example / train_time,
            "eval_per_sec": batch * per_example / eval_time,
            "step_ms": 1e3 * train_time}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
