"""camserve on KServe (protocolVersion v2) with tritonclient's HTTP client.

    python examples/kserve_tritonclient.py camserve-shapes.default.example.com examples/star.png

Prints the top-k and the zero-reference score; exits 1 with the error when camserve refuses
the image. tests/test_kserve.py runs this file against TorchServe's v2 route.
"""

import base64
import json
import sys

import numpy as np
import tritonclient.http as httpclient

url, path = sys.argv[1], sys.argv[2]  # host[:port] of the InferenceService, an image file
client = httpclient.InferenceServerClient(url=url)

image = httpclient.InferInput("image", [1], "BYTES")
with open(path, "rb") as file:
    encoded = base64.b64encode(file.read())
# binary_data=False on input and output: kserve 0.13 cannot parse the binary tensor extension.
image.set_data_from_numpy(np.array([encoded], dtype=np.object_), binary_data=False)
outputs = [httpclient.InferRequestedOutput("explanation", binary_data=False)]

# Options go in the request-level parameters: target, topk, images, maps.
result = client.infer("shapes", [image], outputs=outputs, parameters={"topk": 2})
[output] = result.get_response()["outputs"]
answer = json.loads(output["data"][0])
if output["name"] == "error":  # your input was refused: 200 with a typed error output
    sys.exit(f"refused: {answer['code']} ({answer['status']}): {answer['message']}")
print(json.dumps({k: answer[k] for k in ("predictions", "zero_reference")}))
