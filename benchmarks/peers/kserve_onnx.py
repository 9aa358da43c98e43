"""KServe's side of the serving benchmark: the minimal KServe custom model a user would write to serve
an ONNX file with ONNX Runtime on the CPU, answering Open Inference Protocol ``ModelInfer`` (KServe's
v2 gRPC). It runs in KServe's own venv (benchmarks/peers/kserve_venv.py), not in the project's:

    python kserve_onnx.py --model_name NAME --model_file model.onnx --grpc_port 8081 --http_port 8080

Every other flag is KServe's ``ModelServer`` flag (``kserve.model_server.parser``), with its defaults.
"""

from __future__ import annotations

import argparse

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.utils.utils import cpu_count


class OnnxModel(Model):
    """One ONNX Runtime session (intra-op threads = the available CPUs) answering each request alone."""

    def __init__(self, name: str, model_file: str) -> None:
        super().__init__(name)
        self.model_file = model_file
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_count()
        self.session = ort.InferenceSession(self.model_file, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        images = payload.inputs[0].as_numpy()
        names = [o.name for o in payload.request_outputs or []] or [o.name for o in self.session.get_outputs()]
        results = self.session.run(names, {self.input_name: images})
        outputs = [
            InferOutput(name=name, shape=list(result.shape), datatype="FP32", data=result)
            for name, result in zip(names, results)
        ]
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=outputs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_file", required=True, help="the model.onnx to serve")
    args, _ = parser.parse_known_args()
    ModelServer().start([OnnxModel(args.model_name, args.model_file)])
