# The endpoint's container: NGC's tritonserver 24.10 (Triton 2.51, the release of the tritonserver
# that nvidia-pytriton bundles and the tests run), with this package installed for the python
# models (the diffsr entry model, and the ONNX Runtime flavour's submodules).
#   docker build -t REGISTRY/diffsr:TAG .    then: diffsr kubernetes --image REGISTRY/diffsr:TAG ...
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/diffsr
COPY pyproject.toml README.md ./
COPY export/ export/
COPY runtime/ runtime/
COPY calib/ calib/
COPY triton_models/ triton_models/
COPY app/ app/
RUN python3 -m pip install --no-cache-dir .

EXPOSE 8000 8001 8002
# the model repository (made by `diffsr triton-repo`): mounted at /models or given as s3://, gs://, as://
CMD ["tritonserver", "--model-repository=/models"]
