"""One-off: the train cache of --n JPEG train images, test/exact reused from the 12k cache."""
import sys, time, torch
from pathlib import Path
sys.path.insert(0, "benchmarks")
from netpress import datasets as ds
from netpress.models import find_pretrained, load_pretrained_cifar_resnet
from netpress.split.cached import build_cache
from netpress.split.cut import cut_model
torch.set_num_threads(1)
n = int(sys.argv[1])
root = Path("/work/shared/data")
ref = load_pretrained_cifar_resnet(56, find_pretrained(56, root)).eval()
cut = cut_model(ref, "layer2")
t0 = time.perf_counter()
train = build_cache(ds.loader(ds.cifar10_jpeg_train(root, limit=n), 64, shuffle=True),
                    cut.head, cut.tail, torch.device("cpu"))
print("train cache", len(train), time.perf_counter() - t0, flush=True)
if len(sys.argv) > 2:
    _, test, exact = torch.load("/tmp/h15-split/cache_layer2_12000_10000.pt", weights_only=False)
    torch.save((train, test, exact), f"/tmp/h15-split/cache_layer2_{n}_10000.pt")
