// The crop geometry of star-jax, in the browser: face box -> (scale, centre) -> crop matrix ->
// bilinear warp onto the model's S x S input, and crop pixels back to image pixels.
//
// It follows star_jax.data.transforms and star_jax.detection step for step, so that a
// page crop equals the Python crop (tests/test_web.py compares both):
// - crop matrix: s = S / (scale * 200); x' = s * (x - cx) + (S - 1) / 2 (same for y), built in
//   float64 and stored in float32 as transforms.crop_matrix does;
// - warp: cv2.warpPerspective with INTER_LINEAR and a constant 0 border. OpenCV 5 samples in
//   float32: each output pixel's source point comes from the float32 inverse matrix, the four
//   neighbours are blended with float32 weights, outside pixels count as 0, and the result is
//   rounded (half to even). OpenCV 4 quantises the source point to 1/32 px with 15-bit fixed
//   weights instead; the two differ by a few grey levels on some pixels, far below what moves a
//   landmark by 0.5 px;
// - map back: the inverse of the float32 crop matrix (here in float64; the Python one is float32,
//   a difference of ~1e-4 px).
// Box rules (star_jax.detection.box_to_crop, star_jax.data.original_formats.crop_params):
// 'official' for a box drawn tight around the face, min(w, h) / 200 * 1.05 around its centre;
// 'training' (the crop the model was trained on) from landmarks, max(w, h) / 200 * 1.05 around
// the centre of their box: the webcam tracker's next crop.
// No DOM here: the module runs in the page and in Node.

export const FACE_BOX_UNIT = 200;
export const BOX_MARGIN = 1.05;

const f32 = Math.fround;

/** (scale, center) of a face box {x1, y1, x2, y2} by a box rule: 'official' or 'training'. */
export function boxToCrop(box, rule = 'official') {
  const w = box.x2 - box.x1;
  const h = box.y2 - box.y1;
  let side;
  if (rule === 'official') side = Math.min(w, h);
  else if (rule === 'training') side = Math.max(w, h);
  else throw new Error(`unknown box rule ${rule}`);
  return {scale: side / FACE_BOX_UNIT * BOX_MARGIN,
          center: [(box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2]};
}

/** The box {x1, y1, x2, y2} around points [[x, y], ...]. */
export function pointsBox(points) {
  let x1 = Infinity, y1 = Infinity, x2 = -Infinity, y2 = -Infinity;
  for (const [x, y] of points) {
    x1 = Math.min(x1, x); y1 = Math.min(y1, y); x2 = Math.max(x2, x); y2 = Math.max(y2, y);
  }
  return {x1, y1, x2, y2};
}

/** The training crop of a face whose landmarks are known: the tracker's next crop. */
export function trackingCrop(points) {
  return boxToCrop(pointsBox(points), 'training');
}

/** The affine part [a, b, c, d, e, f] (x' = a x + b y + c, y' = d x + e y + f) of
 *  transforms.crop_matrix, each entry rounded to float32 as there. */
export function cropMatrix(scale, center, size) {
  const s = size / (scale * FACE_BOX_UNIT);
  const mid = (size - 1) / 2;
  return [f32(s), 0, f32(mid - s * center[0]), 0, f32(s), f32(mid - s * center[1])];
}

/** The inverse of an affine [a, b, c, d, e, f], in float64. */
export function invertAffine(m) {
  const [a, b, c, d, e, f] = m;
  const det = a * e - b * d;
  return [e / det, -b / det, (b * f - c * e) / det,
          -d / det, a / det, (c * d - a * f) / det];
}

/** Points (crop pixels) -> image pixels through the inverse of the crop matrix. */
export function cropToImage(points, matrix) {
  const [a, b, c, d, e, f] = invertAffine(matrix);
  return points.map(([x, y]) => [a * x + b * y + c, d * x + e * y + f]);
}

/** Points (image pixels) -> crop pixels. */
export function imageToCrop(points, matrix) {
  const [a, b, c, d, e, f] = matrix;
  return points.map(([x, y]) => [a * x + b * y + c, d * x + e * y + f]);
}

/**
 * The crop: `pixels` (RGBA bytes, width x height, as canvas ImageData) warped by `matrix` onto
 * size x size RGB bytes (into `out` when given). Bilinear, constant 0 border (see the header).
 */
export function warpCrop(pixels, width, height, matrix, size, out) {
  const crop = out || new Uint8ClampedArray(size * size * 3);
  const inv = invertAffine(matrix).map(f32);
  const [ia, ib, ic, id, ie, iff] = inv;
  const lastX = width - 1;
  const lastY = height - 1;
  let o = 0;
  for (let y = 0; y < size; y++) {
    const rowX = f32(f32(ib * y) + ic);
    const rowY = f32(f32(ie * y) + iff);
    for (let x = 0; x < size; x++, o += 3) {
      const sx = f32(f32(ia * x) + rowX);
      const sy = f32(f32(id * x) + rowY);
      const x0 = Math.floor(sx);
      const y0 = Math.floor(sy);
      if (x0 < -1 || y0 < -1 || x0 > lastX || y0 > lastY) {
        crop[o] = 0; crop[o + 1] = 0; crop[o + 2] = 0;
        continue;
      }
      const fx = f32(sx - x0);
      const fy = f32(sy - y0);
      const inX0 = x0 >= 0, inX1 = x0 < lastX, inY0 = y0 >= 0, inY1 = y0 < lastY;
      const p00 = (y0 * width + x0) * 4;
      const p01 = p00 + 4;
      const p10 = p00 + width * 4;
      const p11 = p10 + 4;
      for (let ch = 0; ch < 3; ch++) {
        const v00 = inY0 && inX0 ? pixels[p00 + ch] : 0;
        const v01 = inY0 && inX1 ? pixels[p01 + ch] : 0;
        const v10 = inY1 && inX0 ? pixels[p10 + ch] : 0;
        const v11 = inY1 && inX1 ? pixels[p11 + ch] : 0;
        const top = f32(v00 + f32(fx * (v01 - v00)));
        const bottom = f32(v10 + f32(fx * (v11 - v10)));
        // Uint8ClampedArray rounds half to even and clamps, as OpenCV's saturate_cast.
        crop[o + ch] = f32(top + f32(fy * f32(bottom - top)));
      }
    }
  }
  return crop;
}

/** RGB bytes -> the model's float32 input (values 0-255, NHWC), into `out` when given. */
export function cropToInput(crop, out) {
  const input = out || new Float32Array(crop.length);
  for (let i = 0; i < crop.length; i++) input[i] = crop[i];
  return input;
}
