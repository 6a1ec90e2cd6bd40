// streamplex.js's HeldInput, the pushed input kept until acknowledged: acks drop what they cover, a resume sends again
// from the server's position in pieces, a push past the limit waits for an ack. Prints one JSON report.
import { HeldInput } from "../../client_js/streamplex.js";

const report = {};
const held = new HeldInput(100);
held.add(new Uint8Array(40).fill(1));
held.add(new Uint8Array(40).fill(2));
held.sent = held.end;
held.ack(30);
held.ack(10); // an older ack changes nothing
report.after_ack = { base: held.base, end: held.end, first: held.data[0], length: held.length };
report.rewind_before_base = held.rewind(29);
report.rewind = held.rewind(35);
report.piece = Array.from(held.piece().slice(0, 6));
report.piece_length = held.piece().length;

const big = new HeldInput(1 << 20);
big.add(new Uint8Array(2 * HeldInput.PIECE + 10));
const sizes = [];
for (let piece = big.piece(); piece; piece = big.piece()) {
  sizes.push(piece.length);
  big.sent += piece.length;
}
report.pieces = sizes;

let waited = false;
const room = held.room(60).then(() => { waited = true; });
await new Promise((resolve) => setTimeout(resolve, 20));
report.waiting_before_ack = !waited;
held.ack(70);
await room;
report.after_room = { waited, base: held.base, length: held.length };
console.log(JSON.stringify(report));
