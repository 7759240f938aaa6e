"""Runs in a child interpreter: call a moefleet server with an unchanged tritonclient.

tritonclient and moefleet's generated `inference` protos cannot share one process (both
register `inference.*` in protobuf's default pool), so this script never imports moefleet.

    python _triton_client.py ADDRESS MODEL LAYER DTYPE IN.npy OUT.npy

IN.npy and OUT.npy hold float32; for BF16 the values travel as `ml_dtypes.bfloat16`, which is
how tritonclient takes and gives bf16. With $TLS_CA set it speaks TLS (ssl=True), trusting
that CA, and presents $TLS_CERT / $TLS_KEY when they are set.
"""

import json
import os
import sys

import ml_dtypes
import numpy as np
import tritonclient.grpc as tc


def main(address, model, layer, dtype, src, dst):
    tls = {}
    if os.environ.get("TLS_CA"):
        tls = {"ssl": True, "root_certificates": os.environ["TLS_CA"],
               "private_key": os.environ.get("TLS_KEY"), "certificate_chain": os.environ.get("TLS_CERT")}
    client = tc.InferenceServerClient(address, **tls)
    x = np.load(src)
    if dtype == "BF16":
        x = x.astype(ml_dtypes.bfloat16)
    inp = tc.InferInput("hidden_states", list(x.shape), dtype)
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], parameters={"layer": int(layer)})
    np.save(dst, result.as_numpy("hidden_states").astype(np.float32))
    print(json.dumps({
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "datatype": result.get_output("hidden_states").datatype,
        "version": result.get_response().parameters["routing_version"].int64_param,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
