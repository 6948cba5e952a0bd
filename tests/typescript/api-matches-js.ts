// relay/static/client.d.ts declares exactly what client.js has: the same exports, the same
// public members (names not starting with "_"), the same constructor options, and the same
// required options (those without a default). build/inferred/client.d.ts is what tsc infers
// from client.js itself (tsconfig.infer.json). A mismatch is a type error here.
import type * as Declared from "../../relay/static/client.js";
import type * as Inferred from "./build/inferred/client.js";

type Equal<A, B> =
  (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
type Public<T> = Exclude<keyof T, `_${string}`>;
type RequiredKeys<T> = { [K in keyof T]-?: {} extends Pick<T, K> ? never : K }[keyof T];
type Options<C extends abstract new (...args: never) => unknown> = ConstructorParameters<C>[0];

export const sameExports: Equal<keyof typeof Declared, keyof typeof Inferred> = true;
export const sameMembers: Equal<
  Public<Declared.ProgressClient>,
  Public<Inferred.ProgressClient>
> = true;
export const sameOptions: Equal<
  keyof Options<typeof Declared.ProgressClient>,
  keyof Options<typeof Inferred.ProgressClient>
> = true;
export const sameRequiredOptions: Equal<
  RequiredKeys<Options<typeof Declared.ProgressClient>>,
  RequiredKeys<Options<typeof Inferred.ProgressClient>>
> = true;
export const sameArity: Equal<
  Parameters<typeof Declared.tokenExpiry>["length"],
  Parameters<typeof Inferred.tokenExpiry>["length"]
> = true;
