"""CPU per API request of the operator's client (kube/transport.py: sockets and httptools) against the transports
it replaced, urllib3 and then the standard library's http.client, measured in the same run against the test API
emulation.

All send the same ConfigMap POSTs one after another on one keep-alive connection, encode the body and decode the
answer; only the client's own thread CPU (time.thread_time) is counted, so the emulation's speed does not enter.
Rounds rotate the order; the medians are printed and the ratio ours/urllib3 is the LAST line.

    .venv/bin/python bench/api_client_cost.py            # 1,500 requests per client per round, 4 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator"), str(REPO / "bench")]

import urllib3  # noqa: E402
from operator_throughput import emulator  # noqa: E402

from finetune_operator.kube.client import KubeClient, load_configuration  # noqa: E402


def configmap(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "bench",
                                                                  "labels": {"app.kubernetes.io/name": "bench"}},
            "data": {"config.json": "x" * 1500}}


def ours(client: KubeClient, n: int, tag: str) -> float:
    started = time.thread_time()
    for i in range(n):
        client.request("POST", "/api/v1/namespaces/bench/configmaps", body=configmap(f"{tag}-{i}"))
    return (time.thread_time() - started) / n


def plain_urllib3(server: str, token: str, n: int, tag: str) -> float:
    pool = urllib3.PoolManager(maxsize=1, retries=False)
    headers = {"Accept": "application/json", "Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    started = time.thread_time()
    for i in range(n):
        answer = pool.request("POST", f"{server}/api/v1/namespaces/bench/configmaps?fieldManager=finetune-operator",
                              body=json.dumps(configmap(f"{tag}-{i}")).encode(), headers=headers,
                              timeout=urllib3.Timeout(connect=5, read=10))
        json.loads(answer.data)
    took = (time.thread_time() - started) / n
    pool.clear()
    return took


def plain_http_client(server: str, token: str, n: int, tag: str) -> float:
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    headers = {"Accept": "application/json", "Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    started = time.thread_time()
    for i in range(n):
        conn.request("POST", "/api/v1/namespaces/bench/configmaps?fieldManager=finetune-operator",
                     body=json.dumps(configmap(f"{tag}-{i}")).encode(), headers=headers)
        json.loads(conn.getresponse().read())
    took = (time.thread_time() - started) / n
    conn.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1500, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    import yaml

    with tempfile.TemporaryDirectory() as tmp, emulator(Path(tmp)) as kubeconfig:
        os.environ["KUBECONFIG"] = str(kubeconfig)
        config = yaml.safe_load(Path(kubeconfig).read_text())
        server, token = config["clusters"][0]["cluster"]["server"], config["users"][0]["user"]["token"]
        client = KubeClient(load_configuration(1))
        client.request("POST", "/api/v1/namespaces", body={"metadata": {"name": "bench"}})
        times: dict[str, list[float]] = {"urllib3": [], "http.client": [], "ours": []}
        runs = {"ours": lambda tag: ours(client, args.n, tag),
                "urllib3": lambda tag: plain_urllib3(server, token, args.n, tag),
                "http.client": lambda tag: plain_http_client(server, token, args.n, tag)}
        names = list(runs)
        for r in range(args.rounds):
            for which in names[r % 3:] + names[:r % 3]:
                times[which].append(runs[which](f"{which}-{r}"))
        client.close()
    base, mine = statistics.median(times["urllib3"]), statistics.median(times["ours"])
    print(f"urllib3 (the first transport replaced): {1000 * base:.3f} ms CPU per request (median of {args.rounds} rounds)")
    print(f"http.client (the second): {1000 * statistics.median(times['http.client']):.3f} ms CPU per request")
    print(f"operator client (kube/transport.py): {1000 * mine:.3f} ms CPU per request")
    print(f"ratio operator client/urllib3: {mine / base:.2f}")


if __name__ == "__main__":
    main()
