// Probe (not a kernel of sparsec): can an int8 GEMM that skips the zero weights beat a GEMM library at
// encoder sizes (M = 128 tokens)? docs/kernels.md, "Encoders: could a sparse GEMM that skips work beat the GEMM
// library?". Run through benchmarks/probes/quad_skip_gemm.py, which builds this file and times oneDNN beside it.
//
//   quad_skip_gemm N K M SPARSITY [MODE]   MODE 0: quad lists built once (default); >0: K blocked in MODE quads;
//                                          -1: lists built per call from the packed format (vpexpandb +
//                                          vptestmd + vpcompressd), as a production kernel would
// Activations are transposed to [token block of 128][quad of 4 columns][token][4 bytes]; each row's non-zero
// quads are listed; per listed quad one broadcast of its 4 weights and one vpdpbusd per 16 tokens. Results are
// checked against a scalar reference (exact int32). Prints the median time and dense-equivalent MAC/s.
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <chrono>
#include <random>
#include <cstring>
#include <algorithm>
#include <functional>
using namespace std;
// One listed quad: its 4 weights (broadcast in B) times 128 tokens' 4 activation bytes, into 8 accumulators.
#define QUAD8(B) do { \
    a0=_mm512_dpbusd_epi32(a0,_mm512_loadu_si512(xp),B);     a1=_mm512_dpbusd_epi32(a1,_mm512_loadu_si512(xp+64),B);  \
    a2=_mm512_dpbusd_epi32(a2,_mm512_loadu_si512(xp+128),B); a3=_mm512_dpbusd_epi32(a3,_mm512_loadu_si512(xp+192),B); \
    a4=_mm512_dpbusd_epi32(a4,_mm512_loadu_si512(xp+256),B); a5=_mm512_dpbusd_epi32(a5,_mm512_loadu_si512(xp+320),B); \
    a6=_mm512_dpbusd_epi32(a6,_mm512_loadu_si512(xp+384),B); a7=_mm512_dpbusd_epi32(a7,_mm512_loadu_si512(xp+448),B); \
  } while (0)
static double now(){return chrono::duration<double>(chrono::steady_clock::now().time_since_epoch()).count();}

int main(int argc,char**argv){
  if(argc<5){fprintf(stderr,"usage: quad_skip_gemm N K M SPARSITY [MODE]\n");return 2;}
  int N=atoi(argv[1]),K=atoi(argv[2]),M=atoi(argv[3]); double sp=atof(argv[4]); int KB=argc>5?atoi(argv[5]):0;
  mt19937 g(1); uniform_real_distribution<double> U(0,1);
  vector<int8_t> W((size_t)N*K); for(auto&w:W){ w = U(g)<sp?0:(int8_t)((int)(U(g)*254)-127); if(w==0 && U(g)>=0) {} }
  vector<uint8_t> X((size_t)M*K); for(auto&x:X) x=(uint8_t)(U(g)*256);
  int Q=K/4, MP=(M+15)/16*16, TB=128;
  // X layout: [tb][quad][TB tokens][4]
  int ntb=(MP+TB-1)/TB;
  vector<uint8_t> XT((size_t)ntb*Q*TB*4,0);
  for(int t=0;t<M;t++) for(int q=0;q<Q;q++) memcpy(&XT[(((size_t)(t/TB)*Q+q)*TB+(t%TB))*4], &X[(size_t)t*K+4*q],4);
  // quad lists per row (built once here; production builds per tile per call)
  vector<int32_t> wq; vector<int32_t> off; vector<int64_t> rp(N+1,0);
  for(int n=0;n<N;n++){ for(int q=0;q<Q;q++){ int32_t v; memcpy(&v,&W[(size_t)n*K+4*q],4); if(v){wq.push_back(v); off.push_back(q*TB*4);} } rp[n+1]=wq.size(); }
  printf("nonzero quads %.3f\n",(double)wq.size()/((double)N*Q));
  vector<int32_t> acc((size_t)M*N);
  std::function<void()> run=[&](){
    for(int tb=0;tb<ntb;tb++){
      const uint8_t* xb=&XT[(size_t)tb*Q*TB*4];
      int nt=min(TB,MP-tb*TB)/16;
      for(int n=0;n<N;n++){
        __m512i a0=_mm512_setzero_si512(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0;
        const int32_t* wp=&wq[rp[n]]; const int32_t* op=&off[rp[n]]; int64_t cnt=rp[n+1]-rp[n];
        if(nt==8){
        for(int64_t i=0;i<cnt;i++){
          __m512i b=_mm512_set1_epi32(wp[i]); const uint8_t* xp=xb+op[i];
          QUAD8(b);
        }}
        __m512i as[8]={a0,a1,a2,a3,a4,a5,a6,a7};
        for(int u=0;u<nt;u++){ alignas(64) int32_t tmp[16]; _mm512_store_si512(tmp,as[u]); for(int j=0;j<16;j++){int t=tb*TB+u*16+j; if(t<M) acc[(size_t)t*N+n]=tmp[j];}}
      }
    }
  };
  int KBQ = KB>0?KB:Q; int nkb=(Q+KBQ-1)/KBQ; const int G=32;
  // segment starts per row per kblock
  vector<int64_t> seg((size_t)N*(nkb+1));
  for(int n=0;n<N;n++){ int64_t i=rp[n]; for(int b=0;b<=nkb;b++){ while(i<rp[n+1] && off[i] < b*KBQ*TB*4) i++; seg[(size_t)n*(nkb+1)+b]=i; } }
  vector<__m512i> abuf((size_t)G*8);
  auto runb=[&](){
    for(int tb=0;tb<ntb;tb++){
      const uint8_t* xb=&XT[(size_t)tb*Q*TB*4];
      for(int n0=0;n0<N;n0+=G){ int n1=min(N,n0+G);
        for(auto&v:abuf) v=_mm512_setzero_si512();
        for(int b=0;b<nkb;b++){
          for(int n=n0;n<n1;n++){
            __m512i* A=&abuf[(size_t)(n-n0)*8];
            __m512i a0=A[0],a1=A[1],a2=A[2],a3=A[3],a4=A[4],a5=A[5],a6=A[6],a7=A[7];
            int64_t i0=seg[(size_t)n*(nkb+1)+b], i1=seg[(size_t)n*(nkb+1)+b+1];
            const int32_t* wp=&wq[0]; const int32_t* op=&off[0];
            for(int64_t i=i0;i<i1;i++){
              __m512i bb=_mm512_set1_epi32(wp[i]); const uint8_t* xp=xb+op[i];
              QUAD8(bb);
            }
            A[0]=a0;A[1]=a1;A[2]=a2;A[3]=a3;A[4]=a4;A[5]=a5;A[6]=a6;A[7]=a7;
          }
        }
        for(int n=n0;n<n1;n++) for(int u=0;u<8;u++){ alignas(64) int32_t tmp[16]; _mm512_store_si512(tmp,abuf[(size_t)(n-n0)*8+u]); for(int j=0;j<16;j++){int t=tb*TB+u*16+j; if(t<M) acc[(size_t)t*N+n]=tmp[j];}}
      }
    }
  };
  // packed row-major: masks[n][c], values stream
  int KC=K/64; vector<uint64_t> masks((size_t)N*KC); vector<int8_t> vals; vals.reserve((size_t)N*K);
  for(int n=0;n<N;n++) for(int c=0;c<KC;c++){ uint64_t m=0; for(int j=0;j<64;j++){ int8_t v=W[(size_t)n*K+c*64+j]; if(v){m|=1ull<<j; vals.push_back(v);} } masks[(size_t)n*KC+c]=m; }
  vals.resize(vals.size()+64);
  vector<int64_t> vptr(N+1,0); { int64_t p=0; for(int n=0;n<N;n++){ vptr[n]=p; for(int c=0;c<KC;c++) p+=__builtin_popcountll(masks[(size_t)n*KC+c]); } vptr[N]=p; }
  vector<int64_t> lst((size_t)Q+16);
  auto runf=[&](){
    const __m512i iota=_mm512_setr_epi32(0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15);
    for(int n=0;n<N;n++){
      // build list of (w:int32 | off:int32) as two arrays packed into int64
      int32_t* lw=(int32_t*)lst.data(); int32_t* lo=lw+Q+16;
      static thread_local vector<int32_t> buf(2*(Q+32)); lw=buf.data(); lo=lw+Q+32;
      int64_t cnt=0; const int8_t* p=&vals[vptr[n]];
      for(int c=0;c<KC;c++){ uint64_t m=masks[(size_t)n*KC+c]; __m512i v=_mm512_loadu_si512(p); __m512i w=_mm512_maskz_expand_epi8(m,v); p+=_mm_popcnt_u64(m);
        __mmask16 qm=_mm512_test_epi32_mask(w,w);
        _mm512_mask_compressstoreu_epi32(lw+cnt,qm,w);
        _mm512_mask_compressstoreu_epi32(lo+cnt,qm,_mm512_slli_epi32(_mm512_add_epi32(iota,_mm512_set1_epi32(c*16)),9));
        cnt+=_mm_popcnt_u32(qm); }
      for(int tb=0;tb<ntb;tb++){
        const uint8_t* xb=&XT[(size_t)tb*Q*TB*4];
        __m512i a0=_mm512_setzero_si512(),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0;
        for(int64_t i=0;i<cnt;i++){
          __m512i b=_mm512_set1_epi32(lw[i]); const uint8_t* xp=xb+lo[i];
          QUAD8(b);
        }
        __m512i as[8]={a0,a1,a2,a3,a4,a5,a6,a7}; int nt=min(TB,MP-tb*TB)/16;
        for(int u=0;u<nt;u++){ alignas(64) int32_t tmp[16]; _mm512_store_si512(tmp,as[u]); for(int j=0;j<16;j++){int t=tb*TB+u*16+j; if(t<M) acc[(size_t)t*N+n]=tmp[j];}}
      }
    }
  };
  if(KB>0) { run = runb; }
  if(KB<0) { run = runf; }
  run();
  // check
  for(int t=0;t<M;t+=37) for(int n=0;n<N;n+=13){ long s=0; for(int k=0;k<K;k++) s+=(int)X[(size_t)t*K+k]*W[(size_t)n*K+k]; if(s!=acc[(size_t)t*N+n]){printf("MISMATCH %d %d %ld %d\n",t,n,s,acc[(size_t)t*N+n]);return 1;} }
  vector<double> ts; for(int r=0;r<15;r++){double t0=now(); run(); ts.push_back(now()-t0);} sort(ts.begin(),ts.end());
  double gmacs=(double)M*N*K/ts[7]/1e9;
  printf("N=%d K=%d M=%d sp=%.2f median %.3f ms min %.3f ms  dense-equiv %.1f GMAC/s\n",N,K,M,sp,ts[7]*1e3,ts[0]*1e3,gmacs);
}
