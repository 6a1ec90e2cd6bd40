// AudioWorklet: microphone samples -> 16 kHz mono PCM s16le, posted in blocks of 100 ms (1600 samples).
// The context may already run at 16 kHz; otherwise each output sample is the mean of the input samples it covers
// (a box low-pass before decimation), with linear interpolation across block boundaries.
const TARGET_RATE = 16000;
const BLOCK = 1600;

class PcmEncoder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE;
    this.position = 0; // where the next output sample starts, in input samples since `this.pending` began
    this.pending = new Float32Array(0);
    this.out = new Int16Array(BLOCK);
    this.filled = 0;
  }

  emit(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    this.out[this.filled++] = Math.round(clipped * 32767);
    if (this.filled === BLOCK) {
      this.port.postMessage(this.out.buffer, [this.out.buffer]);
      this.out = new Int16Array(BLOCK);
      this.filled = 0;
    }
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true;
    const mono = new Float32Array(input[0].length);
    for (const channel of input) for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / input.length;
    if (this.ratio === 1) {
      for (const value of mono) this.emit(value);
      return true;
    }
    const joined = new Float32Array(this.pending.length + mono.length);
    joined.set(this.pending);
    joined.set(mono, this.pending.length);
    let position = this.position;
    while (position + this.ratio <= joined.length) {
      const start = Math.floor(position);
      const end = Math.floor(position + this.ratio);
      let sum = 0;
      for (let i = start; i < end; i++) sum += joined[i];
      this.emit(end > start ? sum / (end - start) : joined[start]);
      position += this.ratio;
    }
    const keep = Math.floor(position);
    this.pending = joined.slice(keep);
    this.position = position - keep;
    return true;
  }
}

registerProcessor("pcm-encoder", PcmEncoder);
