// star-jax in the browser: loads an exported ONNX model and its sidecar JSON into
// onnxruntime-web (WASM, threaded when the page is cross-origin isolated), takes a photo (file
// picker, drag and drop) or the webcam, crops the face box the user draws by the official box
// rule (geometry.js, as the Python predictor's box_rule="official"), runs the model and draws
// the landmarks.
//
// Webcam: the first crop comes from the drawn box (or a centred guess); every later crop comes
// from the previous frame's landmarks by the training rule, as star-jax's video tracker does.
// Without a detector in the page a lost track (landmarks collapsing, leaving the frame, or the
// crop jumping in size) falls back to the drawn box.
//
// URL parameters (for people and for tests/test_web.py, benchmarks/web.py):
//   model=URL     the exported model (default model.onnx, which `python -m star_jax.web` serves);
//                 its sidecar is URL.json
//   image=URL     a photo to open at start;  box=x1,y1,x2,y2  its face box (image pixels)
//   camera=1      start the webcam at once;  threads=N  WASM threads (default: half the cores)
//   proxy=1       run the model in a worker (onnxruntime-web's proxy)
// `window.starJax` exposes the same operations to scripts (see the end of this file).

import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';
import * as geo from './geometry.js';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const view = $('view');
const viewContext = view.getContext('2d');
const cropCanvas = $('crop');
const video = $('video');
// Frames and photos are read back through this canvas (never shown).
const work = document.createElement('canvas');
const workContext = work.getContext('2d', {willReadFrequently: true});

const MIN_TRACK_SIDE = 12;        // px: a landmark box smaller than this is a lost track
const MAX_SCALE_JUMP = 1.6;       // crop scale change per frame beyond which the track is lost
const FPS_WINDOW = 30;            // frames the fps figure averages over

const state = {
  model: null,           // {session, sidecar, size, batch, input, output, file}
  source: null,          // 'photo' | 'camera'
  photo: null,           // ImageBitmap of the photo
  frame: null,           // {pixels, width, height}: what the model crops from
  box: null,             // the face box the user drew, image pixels
  result: null,          // the last prediction (see predict())
  track: null,           // landmarks of the previous webcam frame, or null
  camera: null,          // {stream, running, loop}
  stats: {frames: 0, times: [], inferMs: [], frameMs: []},
};

function setStatus(text, isError = false) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('error', isError);
}

function median(values) {
  if (!values.length) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function pushWindow(list, value, size = FPS_WINDOW) {
  list.push(value);
  if (list.length > size) list.shift();
}

// ---------------------------------------------------------------------------------------------
// The model

function configureRuntime() {
  const dist = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;
  ort.env.wasm.wasmPaths = dist;
  // Threads need SharedArrayBuffer, which browsers give only to cross-origin isolated pages
  // (the COOP/COEP headers `python -m star_jax.web` sends). Without threads=N the page keeps
  // onnxruntime-web's default, half the cores (at most 4): the video, the page and the browser
  // need the rest (on a 2-core CPU two model threads ran the webcam path slower than one,
  // benchmarks/RESULTS.md).
  if (!self.crossOriginIsolated) ort.env.wasm.numThreads = 1;
  else if (Number(params.get('threads')) > 0) {
    ort.env.wasm.numThreads = Number(params.get('threads'));
  }
  // proxy=1 runs the model in a worker: the page stays responsive during a long inference.
  ort.env.wasm.proxy = params.get('proxy') === '1';
  ort.env.logLevel = 'error';
}

function checkSidecar(sidecar, name) {
  const problem = (what) => new Error(`${name}: ${what}`);
  if (!sidecar || typeof sidecar !== 'object') throw problem('not a JSON object');
  if (sidecar.format !== 'onnx') {
    throw problem(`a ${sidecar.format} export; the page runs ONNX exports ` +
                  '(python -m star_jax.export --format onnx)');
  }
  const shape = sidecar.input && sidecar.input.shape;
  if (!Array.isArray(shape) || shape.length !== 4 || shape[1] !== shape[2] || shape[3] !== 3) {
    throw problem('input shape is not [B, S, S, 3]');
  }
  if (!Array.isArray(sidecar.outputs) || sidecar.outputs[0].name !== 'landmarks') {
    throw problem("first output is not 'landmarks'");
  }
}

async function loadModel(modelBytes, sidecar, file) {
  checkSidecar(sidecar, `${file}.json`);
  const started = performance.now();
  const session = await ort.InferenceSession.create(modelBytes, {
    executionProviders: ['wasm'],
    graphOptimizationLevel: 'all',
  });
  const size = sidecar.input.shape[1];
  if (state.model) await state.model.session.release();
  state.model = {
    session, sidecar, size, file,
    batch: sidecar.input.shape[0] || 1,
    input: sidecar.input.name || session.inputNames[0],
    output: sidecar.outputs[0].name,
    bytes: modelBytes.byteLength,
    loadMs: performance.now() - started,
  };
  state.inputBuffer = new Float32Array(state.model.batch * size * size * 3);
  state.cropBuffer = new Uint8ClampedArray(size * size * 3);
  const precision = sidecar.quantization || sidecar.precision || 'float32';
  $('stat-model').textContent =
      `${file}: ${sidecar.num_points} points (${sidecar.dataset}), ${size} px, ${precision}, ` +
      `${(modelBytes.byteLength / 2 ** 20).toFixed(1)} MiB`;
  $('stat-runtime').textContent = `onnxruntime-web ${ort.env.versions.web}, WASM, ` +
      `${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads > 1 ? 's' : ''}` +
      (self.crossOriginIsolated ? '' : ' (page not cross-origin isolated)');
  $('camera-button').disabled = false;
  setStatus(`Model ready (${sidecar.num_points} points). Open a photo or start the webcam, ` +
            'then drag a box around the face.');
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status} ${response.statusText}`);
  return response.arrayBuffer();
}

async function loadModelFromUrl(url) {
  const sidecarBytes = await fetchBytes(`${url}.json`);
  let sidecar;
  try {
    sidecar = JSON.parse(new TextDecoder().decode(sidecarBytes));
  } catch (e) {
    throw new Error(`${url}.json: not valid JSON (${e.message})`);
  }
  const name = url.split('/').pop().split('?')[0];
  await loadModel(await fetchBytes(url), sidecar, name);
}

async function loadModelFromFiles(files) {
  const onnx = [...files].find((f) => f.name.endsWith('.onnx'));
  const json = [...files].find((f) => f.name.endsWith('.json'));
  if (!onnx || !json) throw new Error('choose both the .onnx model and its .onnx.json sidecar');
  let sidecar;
  try {
    sidecar = JSON.parse(await json.text());
  } catch (e) {
    throw new Error(`${json.name}: not valid JSON (${e.message})`);
  }
  await loadModel(await onnx.arrayBuffer(), sidecar, onnx.name);
}

/**
 * The landmarks of the face whose crop is `crop` ({scale, center}) in `frame`. Returns
 * {points (image px), cropPoints (crop px), scale, center, matrix, inferMs, cropMs}.
 */
async function predict(frame, crop) {
  const model = state.model;
  const size = model.size;
  const t0 = performance.now();
  const matrix = geo.cropMatrix(crop.scale, crop.center, size);
  geo.warpCrop(frame.pixels, frame.width, frame.height, matrix, size, state.cropBuffer);
  // The proxy worker takes the input's buffer (transferred, detached here): a fresh one per run.
  const data = ort.env.wasm.proxy ? new Float32Array(state.inputBuffer.length) : state.inputBuffer;
  geo.cropToInput(state.cropBuffer, data);
  const t1 = performance.now();
  const input = new ort.Tensor('float32', data, [model.batch, size, size, 3]);
  const outputs = await model.session.run({[model.input]: input});
  const t2 = performance.now();
  const flat = outputs[model.output].data;
  const count = model.sidecar.num_points;
  const cropPoints = [];
  for (let i = 0; i < count; i++) cropPoints.push([flat[2 * i], flat[2 * i + 1]]);
  for (const name in outputs) outputs[name].dispose?.();
  return {points: geo.cropToImage(cropPoints, matrix), cropPoints, scale: crop.scale,
          center: crop.center, matrix, inferMs: t2 - t1, cropMs: t1 - t0};
}

// ---------------------------------------------------------------------------------------------
// Drawing

function drawCrop() {
  if (!$('show-crop').checked || !state.model) return;
  const size = state.model.size;
  if (cropCanvas.width !== size) { cropCanvas.width = size; cropCanvas.height = size; }
  const context = cropCanvas.getContext('2d');
  const rgba = context.createImageData(size, size);
  const rgb = state.cropBuffer;
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    rgba.data[j] = rgb[i]; rgba.data[j + 1] = rgb[i + 1]; rgba.data[j + 2] = rgb[i + 2];
    rgba.data[j + 3] = 255;
  }
  context.putImageData(rgba, 0, 0);
  if (state.result) {
    context.fillStyle = '#ffeb3b';
    const dot = Math.max(1, size / 128);
    for (const [x, y] of state.result.cropPoints) {
      context.fillRect(x - dot / 2, y - dot / 2, dot, dot);
    }
  }
}

function drawOverlay(context) {
  // Line widths and dots follow the face's size, so that small and large faces read alike.
  const result = state.result;
  let faceSide = 0.3 * Math.min(view.width, view.height);
  if (result) {
    const box = geo.pointsBox(result.points);
    faceSide = Math.max(box.x2 - box.x1, box.y2 - box.y1);
  }
  const unit = Math.max(1, faceSide / 80);
  if (state.box && (!state.track || state.source === 'photo')) {
    const {x1, y1, x2, y2} = state.box;
    context.strokeStyle = '#4fc3f7';
    context.lineWidth = 1.5 * unit;
    context.setLineDash([6 * unit, 4 * unit]);
    context.strokeRect(x1, y1, x2 - x1, y2 - y1);
    context.setLineDash([]);
  }
  if (!result) return;
  const points = result.points;
  if ($('show-edges').checked) {
    context.strokeStyle = '#00e5ff';
    context.lineWidth = 0.8 * unit;
    for (const edge of state.model.sidecar.edges || []) {
      context.beginPath();
      edge.points.forEach((index, k) => {
        const [x, y] = points[index];
        if (k === 0) context.moveTo(x, y); else context.lineTo(x, y);
      });
      if (edge.closed) context.closePath();
      context.stroke();
    }
  }
  context.fillStyle = '#ffeb3b';
  const radius = 1.6 * unit;
  for (const [x, y] of points) {
    context.beginPath();
    context.arc(x, y, radius, 0, 2 * Math.PI);
    context.fill();
  }
}

function redraw() {
  if (state.source === 'photo' && state.photo) {
    viewContext.drawImage(state.photo, 0, 0);
  } else if (state.source === 'camera') {
    viewContext.drawImage(work, 0, 0);  // the frame the landmarks belong to
  } else {
    return;
  }
  drawOverlay(viewContext);
  drawCrop();
}

function showStats(result) {
  $('stat-infer').textContent =
      `${result.inferMs.toFixed(1)} ms (crop ${result.cropMs.toFixed(1)} ms)`;
}

// ---------------------------------------------------------------------------------------------
// Photos

function readPixels(source, width, height) {
  if (work.width !== width || work.height !== height) { work.width = width; work.height = height; }
  workContext.drawImage(source, 0, 0, width, height);
  return {pixels: workContext.getImageData(0, 0, width, height).data, width, height};
}

async function openPhoto(blob) {
  stopCamera();
  // Pixels as stored: no colour-space conversion, EXIF orientation applied (as star-jax's
  // image reader does).
  const bitmap = await createImageBitmap(blob, {colorSpaceConversion: 'none',
                                               premultiplyAlpha: 'none'});
  state.photo = bitmap;
  state.source = 'photo';
  state.result = null;
  state.box = null;
  state.track = null;
  view.width = bitmap.width;
  view.height = bitmap.height;
  state.frame = readPixels(bitmap, bitmap.width, bitmap.height);
  $('stage').classList.remove('empty');
  redraw();
  setStatus(`Photo ${bitmap.width} x ${bitmap.height}: drag a box around the face.`);
}

async function predictPhoto() {
  if (!state.model || !state.frame || !state.box) return null;
  const result = await predict(state.frame, geo.boxToCrop(state.box, 'official'));
  state.result = result;
  redraw();
  showStats(result);
  setStatus(`${result.points.length} landmarks in ${result.inferMs.toFixed(0)} ms. Drag a new ` +
            'box to try again.');
  return result;
}

// ---------------------------------------------------------------------------------------------
// Webcam

function defaultBox(width, height) {
  const side = 0.45 * Math.min(width, height);
  return {x1: (width - side) / 2, y1: (height - side) / 2,
          x2: (width + side) / 2, y2: (height + side) / 2};
}

// New webcam frames, counted as the video presents them, so that the loop takes the newest frame
// at once when one arrived during the last inference and waits only when none did.
const frameClock = {presented: 0, waiting: [], generation: 0};

/** Starts counting the frames of the current webcam stream (a new count per stream). */
function watchFrames() {
  const generation = ++frameClock.generation;
  frameClock.presented = 0;
  const live = () => state.camera && generation === frameClock.generation;
  const tick = (presented) => {
    frameClock.presented = presented;
    for (const resolve of frameClock.waiting.splice(0)) resolve();
  };
  if (video.requestVideoFrameCallback) {
    const onFrame = (now, metadata) => {
      tick(metadata.presentedFrames);
      if (live()) video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  } else {  // no per-frame callback: a frame is new when the video's time moved
    let lastTime = -1;
    const onAnimationFrame = () => {
      if (video.currentTime !== lastTime) {
        lastTime = video.currentTime;
        tick(frameClock.presented + 1);
      }
      if (live()) requestAnimationFrame(onAnimationFrame);
    };
    requestAnimationFrame(onAnimationFrame);
  }
}

/** Resolves at once when a frame newer than `seen` was presented, else at the next frame. */
function newVideoFrame(seen) {
  if (frameClock.presented > seen) return Promise.resolve();
  return new Promise((resolve) => frameClock.waiting.push(resolve));
}

function trackLost(previous, next, width, height) {
  const box = geo.pointsBox(next.points);
  const side = Math.max(box.x2 - box.x1, box.y2 - box.y1);
  const cx = (box.x1 + box.x2) / 2, cy = (box.y1 + box.y2) / 2;
  if (!(side >= MIN_TRACK_SIDE) || cx < 0 || cy < 0 || cx > width || cy > height) return true;
  const ratio = geo.trackingCrop(next.points).scale / previous.scale;
  return ratio > MAX_SCALE_JUMP || ratio < 1 / MAX_SCALE_JUMP;
}

async function cameraLoop() {
  const camera = state.camera;
  const stats = state.stats;
  let seen = -1;
  watchFrames();
  while (camera.running) {
    await newVideoFrame(seen);
    if (!camera.running) break;
    seen = frameClock.presented;
    const t0 = performance.now();
    const width = video.videoWidth, height = video.videoHeight;
    if (!width || !height) continue;
    if (view.width !== width || view.height !== height) {
      view.width = width; view.height = height;
      state.box = state.box || defaultBox(width, height);
    }
    state.frame = readPixels(video, width, height);
    const crop = state.track ? geo.trackingCrop(state.track) : geo.boxToCrop(state.box, 'official');
    const result = await predict(state.frame, crop);
    state.track = trackLost(crop, result, width, height) ? null : result.points;
    state.result = result;
    redraw();
    const t1 = performance.now();
    stats.frames += 1;
    pushWindow(stats.times, t1);
    pushWindow(stats.inferMs, result.inferMs);
    pushWindow(stats.frameMs, t1 - t0);
    if (stats.frames % 5 === 0) {
      showStats(result);
      $('stat-frame').textContent = `${median(stats.frameMs).toFixed(1)} ms`;
      $('stat-fps').textContent = cameraFps().toFixed(1);
    }
  }
}

function cameraFps() {
  const times = state.stats.times;
  if (times.length < 2) return 0;
  return (times.length - 1) / ((times[times.length - 1] - times[0]) / 1000);
}

async function startCamera() {
  if (!state.model) throw new Error('no model loaded');
  if (state.camera) return;
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error('this browser gives no webcam access here (it needs https or localhost)');
  }
  const stream = await navigator.mediaDevices.getUserMedia(
      {video: {width: {ideal: 640}, height: {ideal: 480}}, audio: false});
  video.srcObject = stream;
  await video.play();
  state.source = 'camera';
  state.photo = null;
  state.result = null;
  state.track = null;
  state.box = null;
  view.width = 0;  // sized from the first frame
  state.stats = {frames: 0, times: [], inferMs: [], frameMs: []};
  state.camera = {stream, running: true};
  $('stage').classList.remove('empty');
  $('camera-button').textContent = 'Stop webcam';
  setStatus('Webcam: drag a box around your face if the landmarks do not find it.');
  state.camera.loop = cameraLoop().catch((e) => fail(e));
}

function stopCamera() {
  const camera = state.camera;
  if (!camera) return;
  camera.running = false;
  for (const resolve of frameClock.waiting.splice(0)) resolve();
  for (const track of camera.stream.getTracks()) track.stop();
  video.srcObject = null;
  state.camera = null;
  $('camera-button').textContent = 'Start webcam';
}

// ---------------------------------------------------------------------------------------------
// Box drawing, files, drag and drop

function eventToImage(event) {
  // The canvas is letterboxed in its element (object-fit: contain).
  const rect = view.getBoundingClientRect();
  const scale = Math.min(rect.width / view.width, rect.height / view.height);
  const left = rect.left + (rect.width - view.width * scale) / 2;
  const top = rect.top + (rect.height - view.height * scale) / 2;
  return [(event.clientX - left) / scale, (event.clientY - top) / scale];
}

function setBox(box) {
  const x1 = Math.min(box.x1, box.x2), x2 = Math.max(box.x1, box.x2);
  const y1 = Math.min(box.y1, box.y2), y2 = Math.max(box.y1, box.y2);
  state.box = {x1, y1, x2, y2};
  state.track = null;
}

let dragStart = null;
view.addEventListener('pointerdown', (event) => {
  if (!state.source) return;
  dragStart = eventToImage(event);
  view.setPointerCapture(event.pointerId);
});
view.addEventListener('pointermove', (event) => {
  if (!dragStart) return;
  const [x, y] = eventToImage(event);
  setBox({x1: dragStart[0], y1: dragStart[1], x2: x, y2: y});
  state.result = state.source === 'photo' ? null : state.result;
  if (state.source === 'photo') redraw();
});
view.addEventListener('pointerup', (event) => {
  if (!dragStart) return;
  const [x, y] = eventToImage(event);
  const start = dragStart;
  dragStart = null;
  if (Math.abs(x - start[0]) < 8 || Math.abs(y - start[1]) < 8) return;  // a click, not a box
  setBox({x1: start[0], y1: start[1], x2: x, y2: y});
  if (state.source === 'photo') predictPhoto().catch(fail);
});

function fail(error) {
  console.error(error);
  setStatus(`Error: ${error.message || error}`, true);
  window.starJax.error = String(error.message || error);
}

async function handleFiles(files) {
  const list = [...files];
  if (list.some((f) => f.name.endsWith('.onnx'))) {
    setStatus('Loading the model…');
    await loadModelFromFiles(list);
    if (state.box && state.source === 'photo') await predictPhoto();
    return;
  }
  const image = list.find((f) => f.type.startsWith('image/'));
  if (!image) throw new Error('drop an image (or an .onnx model with its .onnx.json)');
  await openPhoto(image);
}

$('photo-input').addEventListener('change', (event) => {
  handleFiles(event.target.files).catch(fail);
  event.target.value = '';
});
$('model-input').addEventListener('change', (event) => {
  handleFiles(event.target.files).catch(fail);
  event.target.value = '';
});
$('camera-button').addEventListener('click', () => {
  if (state.camera) stopCamera(); else startCamera().catch(fail);
});
$('reset-button').addEventListener('click', () => {
  state.track = null;
  if (state.source === 'camera' && view.width) state.box = defaultBox(view.width, view.height);
  if (state.source === 'photo') { state.box = null; state.result = null; redraw(); }
});
$('show-edges').addEventListener('change', redraw);
$('show-crop').addEventListener('change', () => {
  cropCanvas.classList.toggle('hidden', !$('show-crop').checked);
  redraw();
});
const stage = $('stage');
for (const type of ['dragenter', 'dragover']) {
  stage.addEventListener(type, (event) => {
    event.preventDefault();
    stage.classList.add('dragging');
  });
}
stage.addEventListener('dragleave', () => stage.classList.remove('dragging'));
stage.addEventListener('drop', (event) => {
  event.preventDefault();
  stage.classList.remove('dragging');
  handleFiles(event.dataTransfer.files).catch(fail);
});

// ---------------------------------------------------------------------------------------------
// Scripting interface and start-up

function parseBox(text) {
  const values = String(text).split(',').map(Number);
  if (values.length !== 4 || values.some((v) => !Number.isFinite(v))) {
    throw new Error(`box=${text}: expected x1,y1,x2,y2`);
  }
  return {x1: values[0], y1: values[1], x2: values[2], y2: values[3]};
}

function resultJson(result) {
  return result && {points: result.points, cropPoints: result.cropPoints, scale: result.scale,
                    center: result.center, matrix: result.matrix, inferMs: result.inferMs,
                    cropMs: result.cropMs};
}

function bytesToBase64(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

async function start() {
  configureRuntime();
  await loadModelFromUrl(params.get('model') || 'model.onnx');
  if (params.has('image')) {
    const response = await fetch(params.get('image'));
    if (!response.ok) throw new Error(`${params.get('image')}: HTTP ${response.status}`);
    await openPhoto(await response.blob());
    if (params.has('box')) {
      setBox(parseBox(params.get('box')));
      await predictPhoto();
    }
  }
  if (params.get('camera') === '1') {
    await startCamera();
    if (params.has('box')) setBox(parseBox(params.get('box')));
  }
}

window.starJax = {
  error: null,
  /** Photo at `url`, face box [x1, y1, x2, y2] -> the result (image and crop pixels). */
  async predictPhoto(url, box) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    await openPhoto(await response.blob());
    setBox({x1: box[0], y1: box[1], x2: box[2], y2: box[3]});
    return resultJson(await predictPhoto());
  },
  result: () => resultJson(state.result),
  /** The last crop fed to the model: RGB bytes (S x S x 3), base64. */
  cropBase64: () => bytesToBase64(new Uint8Array(state.cropBuffer.buffer)),
  startCamera: () => startCamera(),
  stopCamera: () => stopCamera(),
  setBox: (box) => setBox({x1: box[0], y1: box[1], x2: box[2], y2: box[3]}),
  /** Webcam figures: frames processed, fps over the last frames, median ms per stage. */
  stats: () => ({frames: state.stats.frames, fps: cameraFps(),
                 inferMs: median(state.stats.inferMs), frameMs: median(state.stats.frameMs),
                 tracking: Boolean(state.track),
                 frameSize: state.frame ? [state.frame.width, state.frame.height] : null}),
  info: () => ({crossOriginIsolated: self.crossOriginIsolated,
                threads: ort.env.wasm.numThreads, proxy: ort.env.wasm.proxy,
                ortVersion: ort.env.versions.web,
                model: state.model && {file: state.model.file, bytes: state.model.bytes,
                                       size: state.model.size, loadMs: state.model.loadMs,
                                       numPoints: state.model.sidecar.num_points}}),
};
window.starJax.ready = start().then(() => true, (e) => { fail(e); throw e; });
// Failures are shown on the page; a script that awaits `ready` still sees the rejection.
window.starJax.ready.catch(() => {});
